"""Reading the text files users give (JSONL here), shared by the probe / calibration reader and the task data."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def jsonl_objects(text: str, path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file's ``text``; anything else is refused."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object (JSONL: one object per line)")
        rows.append((number, row))
    return rows

"""Reading the text files users give: one reader with one error for an unreadable file, and one table
reader for JSONL, CSV and TSV (one quoting rule: CSV fields may be quoted, TSV fields are taken as they
are), shared by the probe / calibration reader and the task data."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from .errors import UserError

Row = dict | list  # a JSON object or a header's named fields; a list of fields without a header


def read_text(path: Path, what: str = "") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is refused in one line."""
    name = f"{what} {path}".strip()
    if not path.is_file():
        raise UserError(
            f"cannot read {name}: it does not exist"
            if not path.exists()
            else f"cannot read {name}: it is not a file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"cannot read {name}: it is not UTF-8 text (bad byte at offset {error.start})"
        ) from None
    except OSError as error:
        raise UserError(f"cannot read {name}: {type(error).__name__}") from None


def table_rows(text: str, path: Path, header: bool = True) -> list[tuple[int, Row]]:
    """``(line number, row)`` for every row of a JSONL, CSV or TSV file's ``text`` (by its suffix). JSONL
    rows are objects; CSV / TSV rows are dicts keyed by the header when ``header``, else lists."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return jsonl_objects(text, path)
    csv.field_size_limit(sys.maxsize)
    tab = path.suffix.lower() == ".tsv"
    reader = csv.reader(
        text.splitlines(),
        delimiter="\t" if tab else ",",
        quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL,
    )
    lines = [(reader.line_num, row) for row in reader if row]
    if not header or not lines:
        return lines
    names = lines[0][1]
    return [(number, dict(zip(names, values))) for number, values in lines[1:]]


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

"""The output directory of a fine-tuning run: settings first, checkpoints while training, results at the end.

``run.json`` (the settings, written first), ``checkpoints/`` while training, then the model in the fused
format, ``predictions.jsonl`` for generation tasks and ``metrics.json``; the checkpoints are removed once
the run is complete, so a directory with ``run.json`` and no ``metrics.json`` is an unfinished run.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ..checkpoint_files import check_not_source, check_parents, only_checkpoint_files
from ..errors import UserError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"  # generation tasks: input, output and references per evaluated input
CHECKPOINTS = "checkpoints"
STAGING = ".model-"  # the saved model's folder inside the run before its files move up


def check_out(out: Path, run_record: dict, resume: bool, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an ``out`` this run may not write: see the messages. ``source``: the model's
    folder (None: a hub id)."""
    check_parents(out)
    check_not_source(out, source)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if resume:
        _check_resumable(out, run_record)
    elif out.exists() and any(out.iterdir()) and not _a_run_alone(out):
        raise UserError(f"{out} holds more than a run's files, so it is never replaced; choose another --out")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        unfinished = not (out / METRICS_FILE).is_file()
        hint = "pass --resume to continue it, or --overwrite" if unfinished else "pass --overwrite"
        raise UserError(f"{out} already holds {'an unfinished run' if unfinished else 'a run'}; {hint}")


def _check_resumable(out: Path, run_record: dict) -> None:
    """Refuse to resume anything but an unfinished run of the same settings and the same model files."""
    if not (out / RUN_FILE).is_file():
        raise UserError(f"nothing to resume: {out / RUN_FILE} does not exist")
    if (out / METRICS_FILE).is_file():
        raise UserError(f"the run in {out} is complete (it has {METRICS_FILE}); nothing to resume")
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{out / RUN_FILE} is damaged; start again with --overwrite") from None
    same_path = saved.get("model") == run_record["model"]
    if same_path and saved.get("model_files") != run_record["model_files"]:
        raise UserError(
            f"the model {run_record['model']} was written again since the run in {out} began, so its "
            "checkpoints belong to another model; start again with --overwrite"
        )
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run_record.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"--resume needs the settings of the run in {out}; changed: {'; '.join(changed)}")


def _a_run_alone(out: Path) -> bool:
    """A run folder and nothing else: ``run.json``, files of the kinds a run and its model hold, and no
    folder inside but the checkpoints (and the model's staging copy), so that replacing it never takes a
    project of the user's with it."""
    return (out / RUN_FILE).is_file() and only_checkpoint_files(
        out, lambda name: name == CHECKPOINTS or name.startswith(STAGING)
    )


def start_out(out: Path, run_record: dict, resume: bool, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(out / RUN_FILE, run_record)


def finish_out(out: Path, model, tokenizer, result: dict, outputs: list[dict]) -> None:
    """Save the model (fused format) next to run.json, the generated outputs, metrics.json; drop the checkpoints."""
    from ..persistence import save_pretrained

    staging = out / f"{STAGING}{uuid.uuid4().hex[:8]}"
    save_pretrained(model, staging, tokenizer)
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    if outputs:
        write_jsonl(out / PREDICTIONS_FILE, outputs)
    write_json(out / METRICS_FILE, result)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    os.replace(tmp, path)


def has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.startswith("checkpoint-") for p in directory.iterdir())

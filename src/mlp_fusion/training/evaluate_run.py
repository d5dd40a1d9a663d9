"""``evaluate(model, task, ...)``: score a fine-tuned model on a task's evaluation split, keeping each generated
output if asked: the library verb behind ``mlp-fusion evaluate``."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint_files import check_parents
from ..errors import UserError, check_given
from ..loading import LoadSettings
from .jobs import check_task, score_task
from .run_dir import write_jsonl
from .tasks import TaskOptions


def evaluate(
    model: str | Path,
    task: str = "sst2",
    *,
    options: TaskOptions | None = None,
    load: LoadSettings | None = None,
    predictions: str | Path | None = None,
) -> dict:
    """``model`` (a run folder of :func:`~mlp_fusion.finetune`, or a fine-tuned checkpoint) scored on ``task``'s
    evaluation split, read as ``options`` says: ``{"task", "model", "metrics", "examples", ...}``.

    ``predictions`` (generation tasks): a new JSONL file for one record per input, its output and
    references. Every argument is checked before the model is loaded; an existing file is never replaced.
    """
    check_given((options, TaskOptions, "options"), (load, LoadSettings, "load"))
    options = options or TaskOptions()
    generation = check_task(task, options)
    if predictions is not None:
        predictions = Path(predictions)
        _check_predictions(predictions, task, generation)
    result, records = score_task(str(model), task, options, load)
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(predictions, records)
    return result


def _check_predictions(path: Path, task: str, generation: bool) -> None:
    """Refuse, before any scoring, a predictions file that could not be written or would replace one."""
    if not generation:
        raise UserError(f"--predictions keeps generated outputs, and {task} generates none; leave it out")
    check_parents(path)
    if path.exists():
        raise UserError(f"{path} already exists; choose another --predictions file")

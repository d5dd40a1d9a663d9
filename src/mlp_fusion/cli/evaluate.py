"""``mlp-fusion evaluate``: score a fine-tuned classifier or decoder on a task's evaluation split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .common import add_load_options, load_settings
from .jobs import task_arguments, task_options


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a fine-tuned model on a task's evaluation split")
    evaluate.add_argument(
        "model", help="a directory written by mlp-fusion finetune (or a fine-tuned checkpoint)"
    )
    task_arguments(evaluate)
    evaluate.add_argument(
        "--predictions", type=Path, help="generation tasks: write each output to this JSONL file"
    )
    add_load_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..training.jobs import check_task, score_task
    from ..training.run_dir import write_jsonl

    settings = load_settings(args)  # checked before the data is read
    options = task_options(args)
    generation = check_task(args.task, options)
    if args.predictions is not None:
        _check_predictions(args.predictions, args.task, generation)
    result, records = score_task(args.model, args.task, options, settings)
    if args.predictions is not None and records:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(args.predictions, records)
    if args.json:
        print(json.dumps(result))
    else:
        metrics = result["metrics"]
        print(
            f"{result['model']} on {result['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
    return 0


def _check_predictions(path: Path, task: str, generation: bool) -> None:
    """Refuse, before any scoring, a ``--predictions`` file that could not be written or would replace one."""
    from ..checkpoint_files import check_parents

    if not generation:
        raise UserError(f"--predictions keeps generated outputs, and {task} generates none; leave it out")
    check_parents(path)
    if path.exists():
        raise UserError(f"{path} already exists; choose another --predictions file")

"""``mlp-fusion evaluate``: score a fine-tuned classifier or decoder on a task's evaluation split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    from ..training.evaluate_run import evaluate

    result = evaluate(
        args.model,
        args.task,
        options=task_options(args),
        load=load_settings(args),
        predictions=args.predictions,
    )
    if args.json:
        print(json.dumps(result))
    else:
        metrics = result["metrics"]
        print(
            f"{result['model']} on {result['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
    return 0

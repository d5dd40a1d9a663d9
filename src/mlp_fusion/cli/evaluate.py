"""``mlp-fusion evaluate``: score a fine-tuned classifier or decoder on a task's evaluation split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .common import add_load_options, load_settings
from .jobs import check_decoding, classification_task, generation_data, task_arguments
from .run_dir import write_jsonl


def add_parser(commands) -> None:
    from ..training.generation import GENERATION_TASKS
    from ..training.tasks import TASK_NAMES

    evaluate = commands.add_parser("evaluate", help="score a fine-tuned model on a task's evaluation split")
    evaluate.add_argument(
        "model", help="a directory written by mlp-fusion finetune (or a fine-tuned checkpoint)"
    )
    task_arguments(evaluate, TASK_NAMES + GENERATION_TASKS)
    evaluate.add_argument(
        "--predictions", type=Path, help="generation tasks: write each output to this JSONL file"
    )
    add_load_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..training.generation import GENERATION_TASKS

    settings = load_settings(args)  # checked before the data is read
    if args.task in GENERATION_TASKS:
        result = _evaluate_generation(args, settings)
    else:
        result = _evaluate_classification(args, settings)
    if args.json:
        print(json.dumps(result))
    else:
        metrics = result["metrics"]
        print(
            f"{result['model']} on {result['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
    return 0


def _evaluate_classification(args: argparse.Namespace, settings) -> dict:
    from ..training.classifier import load_trained_classifier
    from ..training.data import load_task_data
    from ..training.finetune import evaluate

    task = classification_task(args)
    loaded = load_trained_classifier(args.model, settings)
    config = loaded.model.config
    if task.name == "csv":  # the label names the model was trained with
        from dataclasses import replace

        task = replace(task, labels=tuple(config.id2label[i] for i in range(config.num_labels)))
    elif config.num_labels != task.num_labels:
        raise UserError(
            f"{args.model} predicts {config.num_labels} classes but {task.name} has {task.num_labels}"
        )
    data = load_task_data(
        task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        need_train=False,
        max_eval_samples=args.max_eval_samples,
    )
    metrics = evaluate(loaded.model, loaded.tokenizer, data, max_length=args.max_length)
    examples = {prefix or "main": len(examples) for prefix, examples in data.evals.items()}
    return {"task": task.name, "model": loaded.source, "metrics": metrics, "examples": examples}


def _evaluate_generation(args: argparse.Namespace, settings) -> dict:
    from ..training.generation import load_causal_lm, score_generation

    check_decoding(args)
    if args.predictions is not None and args.predictions.exists():
        raise UserError(f"{args.predictions} already exists; choose another --predictions file")
    data = generation_data(args, need_train=False)
    loaded = load_causal_lm(args.model, settings)
    metrics, records = score_generation(
        loaded.model, loaded.tokenizer, data.eval, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, max_length=args.max_length,
    )  # fmt: skip
    if args.predictions is not None:
        write_jsonl(args.predictions, records)
    return {"task": args.task, "model": loaded.source, "metrics": metrics, "examples": {"main": len(records)}}

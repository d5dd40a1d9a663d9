"""What differs between fine-tuning a classifier and a data-to-text decoder: data, model, Trainer inputs, scores.

``finetune`` and ``evaluate`` share the task options defined here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .common import load_settings, log


def task_arguments(parser: argparse.ArgumentParser, task_names: tuple[str, ...]) -> None:
    group = parser.add_argument_group("task and data")
    group.add_argument("--task", required=True, help=f"one of: {', '.join(task_names)}")
    group.add_argument(
        "--data", type=Path, help="directory with the train and dev files (GLUE TSV, CSV, JSONL or JSON)"
    )
    group.add_argument("--train-file", type=Path, help="training file (instead of --data)")
    group.add_argument("--eval-file", type=Path, help="evaluation file (instead of --data)")
    group.add_argument("--text-column", help="csv task: the text column")
    group.add_argument("--text-pair-column", help="csv task: the second text column, for sentence pairs")
    group.add_argument("--label-column", help="csv task: the label column")
    group.add_argument("--source-column", help="text2text task: the input column")
    group.add_argument("--target-column", help="text2text task: the reference column")
    group.add_argument("--max-new-tokens", type=int, default=64, help="generation tasks: longest output (64)")
    group.add_argument("--num-beams", type=int, default=1, help="generation tasks: beam width (1: greedy)")
    group.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples only")
    group.add_argument("--max-length", type=int, default=128, help="longest input in tokens (default 128)")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


@dataclass
class Job:
    """What differs between classification and data-to-text runs; the rest of a run is shared."""

    task: str
    loaded: object  # LoadedModel
    trainer_inputs: dict
    final_scores: Callable  # model -> metrics
    main_metric: str
    greater_is_better: bool
    train_count: int
    eval_count: int
    distill_texts: tuple  # (texts, pairs or None)
    outputs: list = field(default_factory=list)  # generation: one record per evaluated input


def classification_task(args: argparse.Namespace):
    from ..training.tasks import get_task

    return get_task(
        args.task,
        text_column=args.text_column,
        pair_column=args.text_pair_column,
        label_column=args.label_column,
    )


def check_decoding(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise UserError("--max-new-tokens and --num-beams must be at least 1")


def classification_job(args: argparse.Namespace, task, settings) -> Job:
    from ..training.classifier import load_classifier
    from ..training.data import load_task_data
    from ..training.finetune import classification_inputs, evaluate

    data = load_task_data(
        task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    log(f"loading {args.model}")
    loaded = load_classifier(args.model, data.task, seed=args.seed, settings=load_settings(args))
    return Job(
        task=data.task.name,
        loaded=loaded,
        trainer_inputs=classification_inputs(data, loaded.tokenizer, settings.max_length),
        final_scores=lambda model: evaluate(
            model, loaded.tokenizer, data, batch_size=settings.batch_size, max_length=settings.max_length
        ),
        main_metric=data.task.main_metric,
        greater_is_better=True,
        train_count=len(data.train),
        eval_count=len(data.evals[""]),
        distill_texts=(data.train.texts, data.train.pairs),
    )


def generation_job(args: argparse.Namespace, settings) -> Job:
    from ..training.data2text import PROMPT_END
    from ..training.generation import (
        generation_inputs,
        load_causal_lm,
        score_generation,
    )

    check_decoding(args)
    data = generation_data(args, need_train=True)
    log(f"loading {args.model}")
    loaded = load_causal_lm(args.model, load_settings(args))
    pairs = data.train_pairs()

    def final_scores(model) -> dict:
        metrics, records = score_generation(
            model, loaded.tokenizer, data.eval, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, batch_size=settings.batch_size, max_length=settings.max_length,
        )  # fmt: skip
        job.outputs = records
        return metrics

    job = Job(
        task=args.task,
        loaded=loaded,
        trainer_inputs=generation_inputs(data, loaded.tokenizer, settings.max_length),
        final_scores=final_scores,
        main_metric="loss",
        greater_is_better=False,
        train_count=len(pairs),
        eval_count=len(data.eval),
        distill_texts=([f"{source}{PROMPT_END} {target}" for source, target in pairs], None),
    )
    return job


def generation_data(args: argparse.Namespace, need_train: bool):
    from ..training.generation import load_generation_data

    if args.text_column or args.text_pair_column or args.label_column:
        raise UserError("--text-column, --text-pair-column and --label-column are for --task csv")
    return load_generation_data(
        args.task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        source_column=args.source_column,
        target_column=args.target_column,
        need_train=need_train,
        max_train_samples=getattr(args, "max_train_samples", None),
        max_eval_samples=args.max_eval_samples,
    )

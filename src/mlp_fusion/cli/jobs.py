"""The task options ``finetune`` and ``evaluate`` share, derived from :class:`~mlp_fusion.training.tasks.TaskOptions`."""

from __future__ import annotations

import argparse

from .common import add_config_options, config_values

# TaskOptions fields both commands take (max_train_samples and sample_seed are finetune's, among its training options)
SHARED = (
    "data", "train_file", "eval_file", "text_column", "text_pair_column", "label_column", "source_column",
    "target_column", "max_new_tokens", "num_beams", "max_eval_samples", "sample", "max_length",
)  # fmt: skip


def task_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.tasks import TaskOptions, task_names

    group = parser.add_argument_group("task and data")
    group.add_argument("--task", required=True, help=f"one of: {', '.join(task_names())}")
    add_config_options(group, TaskOptions, SHARED)
    group.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def task_options(args: argparse.Namespace):
    from ..training.tasks import TaskOptions

    return TaskOptions(**config_values(args, TaskOptions))

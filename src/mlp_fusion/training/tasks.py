"""The tasks ``finetune`` and ``evaluate`` know, one entry each, and the options that say where their data is.

Classification tasks (:class:`Task`: the GLUE set, and ``csv`` for any labelled file) say where their
columns are in the GLUE distribution's TSV files and in the hub dataset (``glue/<task>``), what their
labels are, and how they are scored. Generation tasks (:class:`GenerationTask`: WebNLG, E2E, DART and
``text2text`` for any text pairs) say how their files are read. :func:`register_task` adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .data2text import Item, read_dart, read_e2e, read_text2text, read_webnlg
from .subsets import SAMPLES


@dataclass(frozen=True)
class TaskOptions:
    """Where a task's data is, how much of it to use, and how a generation task decodes."""

    data: Path | None = field(
        default=None,
        metadata={"help": "directory with the train and dev files (GLUE TSV, CSV, JSONL or JSON)"},
    )
    train_file: Path | None = field(default=None, metadata={"help": "training file (instead of --data)"})
    eval_file: Path | None = field(default=None, metadata={"help": "evaluation file (instead of --data)"})
    text_column: str | None = field(default=None, metadata={"help": "csv task: the text column"})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "csv task: the second text column, for sentence pairs"}
    )
    label_column: str | None = field(default=None, metadata={"help": "csv task: the label column"})
    source_column: str | None = field(default=None, metadata={"help": "text2text task: the input column"})
    target_column: str | None = field(default=None, metadata={"help": "text2text task: the reference column"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation tasks: longest output"})
    num_beams: int = field(default=1, metadata={"help": "generation tasks: beam width (1: greedy)"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "train on N examples only (generation tasks: N input-text pairs)"}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on N examples only"})
    sample: str = field(
        default="first",
        metadata={
            "help": "how --max-train-samples / --max-eval-samples choose: 'first' (the file's first N) or "
            "'random' (a seeded draw keeping each category's or label's share; the evaluation draw is "
            "the same for every --sample-seed)",
            "choices": SAMPLES,
        },
    )
    sample_seed: int = field(default=0, metadata={"help": "seed of the random draw of training examples"})
    max_length: int = field(default=128, metadata={"help": "longest input in tokens"})

    def __post_init__(self) -> None:
        for name in ("data", "train_file", "eval_file"):  # the CLI passes strings
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.sample not in SAMPLES:
            raise UserError(f"unknown sample {self.sample!r}: choose {' or '.join(SAMPLES)}")

    def check_decoding(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise UserError("--max-new-tokens and --num-beams must be at least 1")

    @property
    def columns(self) -> dict:
        """The column options that were given, by option name."""
        names = ("text_column", "text_pair_column", "label_column", "source_column", "target_column")
        return {f"--{n.replace('_', '-')}": getattr(self, n) for n in names if getattr(self, n)}


@dataclass(frozen=True)
class EvalSplit:
    file: str  # file stem in a GLUE-format directory
    hub_split: str  # split name of the hub dataset
    prefix: str = ""  # prefix of this split's metric names ("" for the main split)


@dataclass(frozen=True)
class Task:
    name: str
    text: str | int  # column name (or index when the TSV has no header)
    pair: str | int | None
    label: str | int
    hub_text: str
    hub_pair: str | None
    labels: tuple[str, ...] | None  # None: regression (one output)
    metrics: tuple[str, ...]
    header: bool = True
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("dev", "validation"),)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


CLASSIFICATION = {
    task.name: task
    for task in (
        Task("sst2", "sentence", None, "label", "sentence", None, ("negative", "positive"), ("accuracy",)),
        Task(
            "cola", 3, None, 1, "sentence", None, ("unacceptable", "acceptable"), ("matthews",), header=False
        ),
        Task(
            "mrpc",
            "#1 String",
            "#2 String",
            "Quality",
            "sentence1",
            "sentence2",
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
        ),
        Task(
            "qqp",
            "question1",
            "question2",
            "is_duplicate",
            "question1",
            "question2",
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
        ),
        Task(
            "stsb", "sentence1", "sentence2", "score", "sentence1", "sentence2", None, ("pearson", "spearman")
        ),
        Task(
            "mnli",
            "sentence1",
            "sentence2",
            "gold_label",
            "premise",
            "hypothesis",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            eval_splits=(
                EvalSplit("dev_matched", "validation_matched"),
                EvalSplit("dev_mismatched", "validation_mismatched", "mismatched_"),
            ),
        ),
        Task(
            "qnli",
            "question",
            "sentence",
            "label",
            "question",
            "sentence",
            ("entailment", "not_entailment"),
            ("accuracy",),
        ),
        Task(
            "rte",
            "sentence1",
            "sentence2",
            "label",
            "sentence1",
            "sentence2",
            ("entailment", "not_entailment"),
            ("accuracy",),
        ),
    )
}


@dataclass(frozen=True)
class GenerationTask:
    """A data-to-text task for causal language models: how its files become :class:`Item` s."""

    name: str
    read: Callable[[Path, TaskOptions], list[Item]]
    columns: tuple[str, ...] = ()  # TaskOptions fields it needs (and only it takes)


GENERATION = {
    task.name: task
    for task in (
        GenerationTask("webnlg", lambda path, _: read_webnlg(path)),
        GenerationTask("e2e", lambda path, _: read_e2e(path)),
        GenerationTask("dart", lambda path, _: read_dart(path)),
        GenerationTask(
            "text2text",
            lambda path, options: read_text2text(path, options.source_column, options.target_column),
            ("source_column", "target_column"),
        ),
    )
}


def register_task(task: Task | GenerationTask) -> None:
    """Make ``task`` known to ``finetune``, ``evaluate`` and :func:`mlp_fusion.training.jobs.load_job`."""
    if task.name in task_names():
        raise UserError(f"a task called {task.name!r} exists already")
    (CLASSIFICATION if isinstance(task, Task) else GENERATION)[task.name] = task


def task_names() -> tuple[str, ...]:
    return (*CLASSIFICATION, "csv", *GENERATION)


def is_generation(name: str) -> bool:
    if name not in task_names():
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return name in GENERATION


def get_task(
    name: str,
    *,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
) -> Task:
    """The task called ``name``; ``csv`` is built from the column options (its labels come from the data)."""
    if name == "csv":
        if not text_column or not label_column:
            raise UserError("--task csv needs --text-column and --label-column")
        return Task(
            "csv", text_column, pair_column, label_column, text_column, pair_column, (), ("accuracy",)
        )
    if name not in CLASSIFICATION:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    if text_column or pair_column or label_column:
        raise UserError(
            f"--text-column, --text-pair-column and --label-column are for --task csv, not {name}"
        )
    return CLASSIFICATION[name]

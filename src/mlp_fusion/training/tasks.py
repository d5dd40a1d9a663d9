"""The classification tasks ``finetune`` knows: the GLUE set, and ``csv`` for any labelled file.

Each task says where its columns are in the GLUE distribution's TSV files and in the hub dataset
(``glue/<task>``), what its labels are, and how it is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


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


GLUE = {
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
TASK_NAMES = (*GLUE, "csv")


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
    if name not in GLUE:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    if text_column or pair_column or label_column:
        raise UserError(
            f"--text-column, --text-pair-column and --label-column are for --task csv, not {name}"
        )
    return GLUE[name]

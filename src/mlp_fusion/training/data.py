"""Reading labelled examples for a task: GLUE-format TSV directories, CSV / TSV / JSONL files, or the hub.

Every problem with the data (missing file or column, an empty split, a label out of range, a file that
is not UTF-8) is a :class:`UserError` naming the file and the problem, raised before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..textfiles import read_text, table_rows
from .subsets import EVAL_SEED, stratified_indices
from .tasks import Task

EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list  # class indices, or floats for regression
    source: str  # the file (or hub split) they came from, for messages

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int | None, sample: str, seed: int) -> Examples:
        """The first ``count`` examples, or (``sample="random"``) ``count`` drawn keeping each label's share
        (a regression target is not stratified)."""
        if count is None:
            return self
        if sample == "first":
            chosen = range(min(count, len(self)))
        else:
            strata = [label if isinstance(label, int) else 0 for label in self.labels]
            chosen = stratified_indices(strata, count, seed)
        pairs = [self.pairs[i] for i in chosen] if self.pairs is not None else None
        return Examples([self.texts[i] for i in chosen], pairs, [self.labels[i] for i in chosen], self.source)


@dataclass
class TaskData:
    task: Task  # for csv, with the label names found in the data
    train: Examples | None
    evals: dict[str, Examples]  # metric-name prefix -> examples ("" for the main split)


def load_task_data(
    task: Task,
    *,
    data: Path | None = None,
    train_file: Path | None = None,
    eval_file: Path | None = None,
    need_train: bool = True,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    sample: str = "first",
    sample_seed: int = 0,
) -> TaskData:
    """Read the training and evaluation splits of ``task`` from files, or from the hub without any."""
    check_counts(max_train_samples, max_eval_samples)
    if data is None and train_file is None and eval_file is None:
        if task.name == "csv":
            raise UserError("--task csv needs --data DIR or --train-file / --eval-file")
        raw_train, raw_evals = _hub_rows(task, need_train)
    else:
        if data is not None and not data.is_dir():
            raise UserError(f"--data {data} is not a directory; give the folder with train.tsv and dev.tsv")
        raw_train = None
        if need_train:
            raw_train = _read_rows(train_file or find_split(data, ("train",), "--train-file"), task.header)
        raw_evals = {}
        for split in task.eval_splits:
            if eval_file is not None and split.prefix:
                continue  # one --eval-file replaces the main evaluation split only
            stems = (split.file, "validation") if split.file == "dev" else (split.file,)
            raw_evals[split.prefix] = _read_rows(
                eval_file or find_split(data, stems, "--eval-file"), task.header
            )
    if task.labels == ():  # csv: the label names come from the training data
        task = replace(task, labels=_label_names(task, raw_train))
    train = _examples(task, *raw_train).subset(max_train_samples, sample, sample_seed) if raw_train else None
    evals = {
        prefix: _examples(task, *rows).subset(max_eval_samples, sample, EVAL_SEED)
        for prefix, rows in raw_evals.items()
    }
    return TaskData(task, train, evals)


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised examples (no padding: the collator pads each batch to its longest example)."""

    def __init__(self, examples: Examples, tokenizer, max_length: int):
        self.features = tokenizer(
            examples.texts, examples.pairs, truncation=True, max_length=max_length, padding=False
        )
        self.labels = examples.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {name: values[index] for name, values in self.features.items()}
        item["labels"] = self.labels[index]
        return item


Rows = list  # of (line number, row) pairs; a row is a dict, or a list when the file has no header


def check_counts(max_train_samples: int | None, max_eval_samples: int | None) -> None:
    for count, option in (
        (max_train_samples, "--max-train-samples"),
        (max_eval_samples, "--max-eval-samples"),
    ):
        if count is not None and count < 1:
            raise UserError(f"{option} must be at least 1, not {count}")


def find_split(
    directory: Path | None, stems: tuple[str, ...], option: str, extensions: tuple[str, ...] = EXTENSIONS
) -> Path:
    """The first ``stem.ext`` file in ``directory`` (stems and extensions in order of preference)."""
    if directory is None:
        raise UserError(f"no {stems[0]} split: pass --data DIR or {option}")
    for stem in stems:
        for extension in extensions:
            if (directory / f"{stem}{extension}").is_file():
                return directory / f"{stem}{extension}"
    names = " or ".join(f"{stem}{extensions[0]}" for stem in stems)
    raise UserError(f"{directory} has no {names} (nor {' / '.join(extensions[1:])}); pass {option} FILE")


def _read_rows(path: Path, header: bool) -> tuple[Rows, Path]:
    rows = table_rows(read_text(path), path, header)
    if not rows:
        raise UserError(f"{path} has no examples")
    return rows, path


def _column(row, key, path: Path, number: int) -> str:
    value = row.get(key) if isinstance(row, dict) else (row[key] if key < len(row) else None)
    if value is None:
        where = f"column {key!r}" if isinstance(key, str) else f"column {key + 1}"
        if isinstance(row, dict) and number <= 2:
            raise UserError(f"{path} has no {where} (its columns: {', '.join(map(str, row))})")
        raise UserError(f"{path} line {number} has no {where}")
    return str(value)


def _examples(task: Task, rows: Rows, path: Path) -> Examples:
    texts, pairs, labels = [], [] if task.pair is not None else None, []
    for number, row in rows:
        texts.append(_column(row, task.text, path, number))
        if pairs is not None:
            pairs.append(_column(row, task.pair, path, number))
        labels.append(_label(task, _column(row, task.label, path, number).strip(), path, number))
    return Examples(texts, pairs, labels, str(path))


def _label(task: Task, value: str, path: Path, number: int):
    if task.labels is None:
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{path} line {number}: label {value!r} is not a number") from None
    if value in task.labels:
        return task.labels.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(task.labels):
        return int(value)
    raise UserError(
        f"{path} line {number}: label {value!r} is out of range; {task.name} labels are "
        f"{', '.join(task.labels)} or 0..{len(task.labels) - 1}"
    )


def _label_names(task: Task, raw_train: tuple[Rows, Path] | None) -> tuple[str, ...]:
    if raw_train is None:
        raise UserError("--task csv needs the training file to know its labels")
    rows, path = raw_train
    values = {_column(row, task.label, path, number).strip() for number, row in rows}
    if len(values) < 2:
        raise UserError(
            f"{path}: every example has the label {values.pop()!r}; a classifier needs at least two"
        )
    if all(v.lstrip("-").isdigit() for v in values):
        numbers = sorted(int(v) for v in values)
        if numbers[0] < 0:
            raise UserError(f"{path}: label {numbers[0]} is negative; integer labels must be 0, 1, 2, ...")
        names = tuple(str(i) for i in range(numbers[-1] + 1))
    else:
        names = tuple(sorted(values))
    return names


def _hub_rows(task: Task, need_train: bool) -> tuple[tuple[Rows, Path] | None, dict]:
    """The hub dataset's splits as rows with the TSV column names, so one code path reads both."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"no --data given and the 'datasets' package is not installed; pass --data DIR with GLUE-format "
            f"train.tsv and dev.tsv, or pip install datasets to download glue/{task.name}"
        ) from None
    try:
        dataset = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as error:  # offline, or the hub refused: one line, and what to do instead
        raise UserError(
            f"cannot download glue/{task.name} ({first_line(error)}); pass --data DIR with train.tsv and dev.tsv"
        ) from None

    def rows(split: str) -> tuple[Rows, Path]:
        converted = []
        for number, item in enumerate(dataset[split], 1):
            row = {task.text: item[task.hub_text], task.label: str(item["label"])}
            if task.pair is not None:
                row[task.pair] = item[task.hub_pair]
            converted.append((number, row if task.header else _as_list(task, row)))
        return converted, Path(f"glue/{task.name}/{split}")

    evals = {split.prefix: rows(split.hub_split) for split in task.eval_splits}
    return (rows("train") if need_train else None), evals


def _as_list(task: Task, row: dict) -> list:
    """A header-less TSV row (CoLA) with the text and the label at the task's column indices."""
    values = [""] * (max(task.text, task.label) + 1)
    values[task.text], values[task.label] = row[task.text], row[task.label]
    return values

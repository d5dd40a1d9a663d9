"""The GLUE metrics: accuracy, F1 of the positive class, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

import numpy as np


def accuracy(predictions, labels) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1(predictions, labels) -> float:
    """F1 of class 1 (binary tasks); 0 when class 1 is never predicted nor present."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    true_positive = float(np.sum(p & y))
    denominator = float(np.sum(p) + np.sum(y))
    return 2 * true_positive / denominator if denominator else 0.0


def matthews(predictions, labels) -> float:
    """Matthews correlation coefficient (multi-class form); 0 when either side is constant."""
    p, y = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(p, y)
    confusion = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=np.float64)
    total, correct = confusion.sum(), np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    numerator = correct * total - true_counts @ predicted_counts
    denominator = np.sqrt(total**2 - predicted_counts @ predicted_counts) * np.sqrt(
        total**2 - true_counts @ true_counts
    )
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def spearman(predictions, labels) -> float:
    return pearson(_ranks(predictions), _ranks(labels))


def _ranks(values) -> np.ndarray:
    """Ranks starting at 1, ties given their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return (sums / counts)[inverse]


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def score(names: tuple[str, ...], logits: np.ndarray, labels, prefix: str = "") -> dict[str, float]:
    """The named metrics of a model's outputs: argmax for classifiers, the single output for regression."""
    logits = np.asarray(logits)
    predictions = logits[:, 0] if logits.ndim == 2 and logits.shape[1] == 1 else logits.argmax(-1)
    return {prefix + name: METRICS[name](predictions, labels) for name in names}

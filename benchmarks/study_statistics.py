"""The study's statistics, from the kept outputs alone: corpus BLEU per run, mean and sample standard
deviation over seeds, and the 95% interval of a BLEU difference between two rows from a paired bootstrap
over test inputs.

sacrebleu's own paired bootstrap compares one output set per system; here each row has one per seed, and
the seeds must stay paired with the inputs, so the resampling is done here on sacrebleu's own per-input
BLEU statistics (the same numbers its corpus score sums): every resample draws one multiset of test inputs
and scores every seed of both rows on it.
"""

from __future__ import annotations

import statistics

import numpy as np
from sacrebleu.metrics import BLEU

RESAMPLES = 1000


def bleu_statistics(outputs: list[str], references: list[list[str]]) -> np.ndarray:
    """sacrebleu's BLEU statistics of each output against all its references, ``[inputs, k]``."""
    most = max(len(refs) for refs in references)
    # reference streams, a None where an input has fewer references (as sacrebleu's corpus score takes them)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return np.array(BLEU()._extract_corpus_statistics(outputs, streams), dtype=np.int64)


def corpus_bleu(stats: np.ndarray) -> float:
    """Corpus BLEU of the inputs whose statistics ``stats`` holds."""
    return BLEU()._compute_score_from_stats(stats.sum(0).tolist()).score


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_interval(
    first: list[np.ndarray], second: list[np.ndarray], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """The mean-over-seeds BLEU of ``first`` minus that of ``second`` (each a list of per-seed statistics,
    seeds paired by position), and its 95% paired-bootstrap interval: (difference, low, high)."""
    return _bootstrap(
        lambda rows: _mean_bleu(first, rows) - _mean_bleu(second, rows), [*first, *second], resamples, seed
    )


def bleu_interval(
    runs: list[np.ndarray], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """One row's mean-over-seeds BLEU and its 95% bootstrap interval over test inputs: (bleu, low, high)."""
    return _bootstrap(lambda rows: _mean_bleu(runs, rows), runs, resamples, seed)


def _mean_bleu(runs: list[np.ndarray], rows: np.ndarray | slice) -> float:
    return statistics.mean(corpus_bleu(stats[rows]) for stats in runs)


def _bootstrap(score, runs: list[np.ndarray], resamples: int, seed: int) -> tuple[float, float, float]:
    """``score`` of every test input, and the 2.5th and 97.5th percentiles of ``score`` over ``resamples``
    multisets of them (each one multiset for every run, so the runs stay paired)."""
    inputs = len(runs[0])
    if any(len(stats) != inputs for stats in runs):
        raise ValueError("every run must score the same test inputs")
    draw = np.random.default_rng(seed)
    resampled = [score(draw.integers(0, inputs, inputs)) for _ in range(resamples)]
    low, high = np.percentile(resampled, [2.5, 97.5])
    return score(slice(None)), float(low), float(high)

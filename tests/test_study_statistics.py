"""The study's statistics (benchmarks/study_statistics.py): what every reported BLEU interval rests on."""

import random
import sys
from pathlib import Path

import pytest
import sacrebleu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from study_statistics import bleu_interval, bleu_statistics, corpus_bleu, paired_interval  # noqa: E402

WORDS = "the airport serves the city of abilene in texas and its runway is long".split()


def _outputs(seed: int, count: int = 60, noise: float = 0.3) -> tuple[list[str], list[list[str]]]:
    draw = random.Random(seed)
    references = [[" ".join(draw.sample(WORDS, 8)) for _ in range(draw.randint(1, 3))] for _ in range(count)]
    outputs = [
        " ".join(w if draw.random() > noise else draw.choice(WORDS) for w in refs[0].split())
        for refs in references
    ]
    return outputs, references


def test_per_input_statistics_sum_to_sacrebleus_corpus_score():
    outputs, references = _outputs(0)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(3)]
    expected = sacrebleu.corpus_bleu(outputs, streams).score
    assert corpus_bleu(bleu_statistics(outputs, references)) == pytest.approx(expected, abs=1e-9)


def test_a_row_against_itself_differs_by_nothing_and_a_better_row_is_ahead():
    outputs, references = _outputs(1, noise=0.5)
    better = [refs[0] for refs in references]  # the first reference itself
    worse = [bleu_statistics(outputs, references)]
    best = [bleu_statistics(better, references)]
    assert paired_interval(worse, worse, resamples=50) == (0.0, 0.0, 0.0)
    difference, low, high = paired_interval(best, worse, resamples=200)
    assert 0 < low <= difference <= high


def test_runs_on_different_inputs_are_refused():
    outputs, references = _outputs(2)
    stats = bleu_statistics(outputs, references)
    with pytest.raises(ValueError, match="same test inputs"):
        paired_interval([stats], [stats[:-1]])


def test_a_rows_interval_holds_its_bleu_and_narrows_with_agreeing_seeds():
    outputs, references = _outputs(3, noise=0.4)
    stats = bleu_statistics(outputs, references)
    bleu, low, high = bleu_interval([stats], resamples=200)
    assert bleu == pytest.approx(corpus_bleu(stats)) and low < bleu < high
    other = bleu_statistics(_outputs(3, noise=0.4)[0][::-1], references)  # outputs on the wrong inputs
    _, mixed_low, mixed_high = bleu_interval([stats, other], resamples=200)
    assert mixed_high - mixed_low < high - low  # two seeds averaged vary less than one


def test_rows_are_compared_over_three_seeds_or_a_one_seed_row_against_seed_0():
    from study_report import _paired

    runs = {
        name: [bleu_statistics(*_outputs(seed, noise=noise)) for seed in range(seeds)]
        for name, seeds, noise in (("full", 3, 0.1), ("S1-default", 2, 0.3), ("S1-paper", 1, 0.5))
    }
    assert _paired(runs, "full", "S1-default") is None  # two seeds of one row: no verdict yet
    assert _paired(runs, "full", "S1-paper") == paired_interval(runs["full"][:1], runs["S1-paper"])
    runs["S1-default"].append(bleu_statistics(*_outputs(2, noise=0.3)))
    assert _paired(runs, "full", "S1-default") == paired_interval(runs["full"], runs["S1-default"])
    runs["S1-default"] = runs["S1-default"][:1]  # one seed of a row that should have three
    assert _paired(runs, "full", "S1-default") is None

"""The perplexity-ratio interval of the benchmarks that score held-out texts (benchmarks/_held_out.py)."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _held_out import perplexity_of, ratio_interval  # noqa: E402


def _losses(seed: int, shift: float, texts: int = 80) -> list[list[float]]:
    """Per-text [nll, tokens]: a text's mean loss varies around 3 nats a token, plus ``shift``."""
    draw = random.Random(seed)
    pairs = []
    for _ in range(texts):
        tokens = draw.randint(5, 40)
        pairs.append([tokens * (3.0 + draw.gauss(0, 0.5) + shift), tokens])
    return pairs


def test_perplexity_of_pools_tokens():
    pairs = [[10.0, 5], [2.0, 5]]
    assert perplexity_of(pairs) == pytest.approx(math.exp(12.0 / 10))
    assert perplexity_of(pairs, [0, 0]) == pytest.approx(math.exp(2.0))


def test_ratio_is_the_geometric_mean_over_seeds_and_its_interval_holds_it():
    base = _losses(0, 0.0)
    worse = [[[nll + tokens * shift, tokens] for nll, tokens in base] for shift in (0.1, 0.3)]
    ratio, low, high = ratio_interval(worse, [base])
    assert ratio == pytest.approx(math.exp(0.2))  # exp(mean of 0.1 and 0.3 nats a token)
    assert low == pytest.approx(ratio) and high == pytest.approx(ratio)  # the same shift on every text


def test_interval_is_paired_over_texts():
    base = _losses(0, 0.0)
    # the same texts, each a little worse with noise: paired, the interval sits clear of 1
    noisy = [
        [
            [nll + tokens * (0.05 + random.Random(i).gauss(0, 0.05)), tokens]
            for i, (nll, tokens) in enumerate(base)
        ]
    ]
    ratio, low, high = ratio_interval(noisy, [base])
    assert 1.0 < low < ratio < high
    # against an unrelated draw of texts the spread between texts dominates: far wider
    _, unpaired_low, unpaired_high = ratio_interval([_losses(1, 0.05)], [base])
    assert unpaired_high - unpaired_low > 3 * (high - low)


def test_runs_of_other_texts_are_refused():
    with pytest.raises(ValueError, match="same texts"):
        ratio_interval([_losses(0, 0.0, texts=10)], [_losses(0, 0.0, texts=11)])


def test_own_healing_texts_hold_no_test_text_and_follow_their_seed():
    from _held_out import DATA, domains, training_texts

    if not DATA.is_dir():
        pytest.skip(f"needs the shared data sets in {DATA}")
    texts = training_texts(90, seed=1)
    assert len(texts) == len(set(texts)) == 90
    assert not {text for group in domains("test").values() for text in group} & set(texts)
    assert training_texts(90, seed=1) == texts != training_texts(90, seed=2)

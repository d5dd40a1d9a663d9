"""Nucleus sampling of calibration and healing texts (mlp_fusion.sampling)."""

import pytest
import torch
from tiny_models import build

from mlp_fusion import sampling
from mlp_fusion.sampling import nucleus_choice, sample_ids

PROBABILITIES = torch.tensor([0.05, 0.5, 0.15, 0.3])  # nucleus at 0.9: words 1, 3, 2 (mass before 2: 0.8)


@pytest.mark.parametrize("widths", [(1024, 16384), (2,), (1, 3)])
def test_the_draw_follows_the_nucleus_whichever_way_it_is_found(monkeypatch, widths):
    monkeypatch.setattr(sampling, "CANDIDATES", widths)  # (2,) and (1, 3): the fallbacks, then the sort
    torch.manual_seed(0)
    logits = PROBABILITIES.log().expand(20000, -1)
    counts = torch.bincount(nucleus_choice(logits, top_p=0.9), minlength=4).float() / 20000
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95
    assert counts[0] == 0 and torch.allclose(counts, expected, atol=0.015)


def test_the_first_word_is_always_in_the_nucleus_and_temperature_sharpens():
    logits = PROBABILITIES.log().expand(500, -1)
    assert set(nucleus_choice(logits, top_p=0.1).tolist()) == {1}
    cold = nucleus_choice(logits, top_p=0.99, temperature=0.1)
    assert (cold == 1).float().mean() > 0.99


def test_sampled_sequences_stop_at_the_end_token_and_are_seeded():
    model = build("llama")
    torch.manual_seed(3)
    first = sample_ids(model, start=1, end=5, rows=6, new_tokens=12, top_p=0.95, temperature=1.0)
    torch.manual_seed(3)
    again = sample_ids(model, start=1, end=5, rows=6, new_tokens=12, top_p=0.95, temperature=1.0)
    assert first == again and len(first) == 6
    assert all(len(row) <= 12 and 5 not in row for row in first)


def test_a_row_is_cut_before_its_end_token_and_the_loop_stops_when_every_row_has_ended(monkeypatch):
    calls = []

    def scripted(logits, top_p, temperature):  # row 0 ends at its 4th token, row 1 at its 6th
        calls.append(1)
        step = len(calls)
        return torch.tensor([5 if step == 4 else 7, 5 if step == 6 else 8])

    monkeypatch.setattr(sampling, "nucleus_choice", scripted)
    rows = sample_ids(build("llama"), start=1, end=5, rows=2, new_tokens=20, top_p=0.9, temperature=1.0)
    assert rows == [[7, 7, 7], [8, 8, 8, 8, 8]] and len(calls) == 6

"""Nucleus sampling of calibration and healing texts (mlp_fusion.sampling)."""

import pytest
import torch
from tiny_models import build

from mlp_fusion import recipes, sampling
from mlp_fusion.recipes import in_dtype
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


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_sampler_decodes_a_bfloat16_copy_of_the_weights_and_leaves_the_model_alone(family):
    model = build(family)
    assert in_dtype(model, None) is model
    copied = in_dtype(model, "bfloat16")
    assert copied is not model and in_dtype(copied, "bfloat16") is copied
    assert {p.dtype for p in copied.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # buffers keep their precision (rotary frequencies in bfloat16 would turn late positions)
    for (name, kept), (_, original) in zip(copied.named_buffers(), model.named_buffers()):
        assert kept.dtype == original.dtype, name
    if model.config.tie_word_embeddings:
        assert copied.get_output_embeddings().weight is copied.get_input_embeddings().weight
    ids = torch.tensor([[1, 7, 9, 4, 3, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = copied(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_sampled_texts_come_from_the_bfloat16_copy_by_default(monkeypatch):
    seen = []
    monkeypatch.setattr(recipes, "sample_ids", lambda model, *a: seen.append(model) or [[7, 8]] * a[2])
    model, tokenizer = build("llama"), _Tokenizer()
    recipes.sample_texts(model, tokenizer, recipes.Sampling(count=3))
    recipes.sample_texts(model, tokenizer, recipes.Sampling(count=3, dtype=None))
    assert next(seen[0].parameters()).dtype == torch.bfloat16 and seen[1] is model


class _Tokenizer:
    bos_token_id, eos_token_id = 1, 2

    def batch_decode(self, ids, skip_special_tokens):
        return [" ".join(map(str, row)) for row in ids]

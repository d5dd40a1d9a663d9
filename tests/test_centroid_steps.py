"""The healing benchmark's lead of even steps for fused neurons (benchmarks/_centroid_steps.py)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build, save_tokenizer

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.loading import load_tokenizer
from mlp_fusion.training.heal import HealSettings, heal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _centroid_steps import centroid_divisors, even_centroid_steps  # noqa: E402

TEXTS = ["the movie was good and the plot was nice", "ana serves rice in the north"] * 4


def test_a_fused_neurons_step_is_divided_by_its_scale_and_nothing_else_changes(tmp_path):
    original = build("llama")
    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    fused = copy.deepcopy(original)
    fuse(fused, FusionConfig(ratio=0.25))
    plain, even = fused, copy.deepcopy(fused)
    start = {name: p.detach().clone() for name, p in fused.named_parameters()}
    settings = HealSettings(heal_steps=1, heal_lr=1e-2, heal_precision="float32")
    heal(plain, original, tokenizer, TEXTS, settings)
    heal(even, original, tokenizer, TEXTS, settings, after_step=even_centroid_steps(even))
    divided = {id(stored): divisor for stored, divisor in centroid_divisors(even)}
    assert divided and any(bool((d > 1).any()) for d in divided.values())  # some neuron stands for several
    moved = dict(plain.named_parameters())
    for name, parameter in even.named_parameters():
        step = moved[name].detach() - start[name]
        expected = step / divided[id(parameter)] if id(parameter) in divided else step
        assert torch.allclose(parameter.detach() - start[name], expected, atol=1e-7), name


def test_a_pruned_model_has_no_fused_neuron_to_divide():
    pruned = build("llama")
    fuse(pruned, FusionConfig(ratio=0.25, method="prune"))
    assert centroid_divisors(pruned) == []
    with pytest.raises(ValueError, match="no fused neuron"):
        even_centroid_steps(pruned)

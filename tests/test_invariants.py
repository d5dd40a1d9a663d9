"""Invariants over every family x every registered method, with degenerate weights, generated not listed.

A new family (tiny_models.FAMILIES) or method (the registry) is checked here without anyone adding a test.
Each (family, method) pair gets one kind of degenerate weights per seed, rotating through them;
``MLP_FUSION_INVARIANT_SEEDS=N`` runs N seeds (default 1 in CI; more on benchmark days).
"""

import copy
import os

import pytest
import torch
from tiny_models import FAMILIES, build, duplicate_neurons, inputs, outputs

import mlp_fusion
from mlp_fusion import METHODS, FusionConfig, UserError, find_sites, fuse

DEGENERATE = ("none", "zero rows", "duplicates", "norms", "bfloat16")
SEEDS = range(int(os.environ.get("MLP_FUSION_INVARIANT_SEEDS", "1")))
CASES = [
    (family, method, DEGENERATE[(f + m + seed) % len(DEGENERATE)], seed)
    for seed in SEEDS
    for f, family in enumerate(FAMILIES)
    for m, method in enumerate(sorted(METHODS))
]


def degenerate(family: str, kind: str, seed: int) -> torch.nn.Module:
    """A tiny model with one kind of awkward weights in its MLPs."""
    model = build(family, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    if kind == "duplicates":
        duplicate_neurons(model)
    with torch.no_grad():
        for site in find_sites(model):
            for slot in site.slots():
                weight = getattr(slot.module, slot.attr)
                rows = weight.shape[slot.neuron_axis]
                picked = torch.randperm(rows, generator=generator)[:2]
                index = [slice(None)] * weight.dim()
                index[slot.neuron_axis] = picked[:1]
                if kind == "zero rows" and slot.role == "output":
                    weight[tuple(index)] = 0  # a neuron that computes nothing but still gets gradient
                if kind == "norms":
                    weight[tuple(index)] *= 1e3
                    index[slot.neuron_axis] = picked[1:]
                    weight[tuple(index)] *= 1e-3
    if kind != "bfloat16":
        return model
    if hasattr(model, "set_experts_implementation"):  # the tiny widths are too narrow for bf16 grouped_mm
        model.set_experts_implementation("eager")
    return in_bfloat16_as_loaded(model)


def in_bfloat16_as_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in bfloat16 with its derived buffers (rotary frequencies, embedding scales) computed in the
    dtypes transformers gives them when it loads a bfloat16 model: what a save and a load give back."""
    from pathlib import Path

    from mlp_fusion.checkpoint_files import meta_model

    loaded = dict(meta_model(type(model), model.config, torch.bfloat16, Path("no-directory")).named_buffers())
    derived = [
        (module, name, module._buffers[name].clone(), loaded.get(f"{prefix}.{name}" if prefix else name))
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]
    model.to(torch.bfloat16)
    for module, name, exact, reference in derived:
        if reference is not None:
            module._buffers[name] = exact.to(reference.dtype)
    return model


def tolerance(kind: str, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) + 1e-6
    relative = {"bfloat16": 2e-2, "norms": 1e-4}.get(kind, 1e-5)  # float rounding grows with the norms
    return relative * scale


def gradient_norm(model: torch.nn.Module, batch: dict) -> float:
    """The norm of the gradient of every trainable tensor: it does not depend on the order of neurons."""
    model.zero_grad()
    extra = {"decoder_input_ids": batch["input_ids"]} if model.config.is_encoder_decoder else {}
    model(**batch, **extra)[0].float().pow(2).mean().backward()  # eval mode: no dropout
    return float(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None) ** 0.5)


@pytest.mark.parametrize("family, method, kind, seed", CASES)
def test_full_width_refusal_and_save_load(tmp_path, family, method, kind, seed):
    model, batch = degenerate(family, kind, seed), inputs(seed=seed)
    before = outputs(model, batch)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(UserError):  # a refused option leaves the model unchanged
        fuse(model, FusionConfig(method=method, layers=[99]))
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())

    if METHODS[method].exact_at_full_width and kind != "bfloat16":  # the registry says which must be
        full = copy.deepcopy(model)
        fuse(full, FusionConfig(method=method, ratio=1.0, seed=seed))
        assert (outputs(full, batch) - before).abs().max() <= tolerance(kind, before)
        expected = gradient_norm(copy.deepcopy(model), batch)
        assert gradient_norm(full, batch) == pytest.approx(expected, rel=1e-4, abs=1e-8)

    fuse(model, FusionConfig(method=method, ratio=0.5, seed=seed))
    fused = outputs(model, batch)
    assert torch.isfinite(fused).all()
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    reloaded = mlp_fusion.from_pretrained(tmp_path / "fused")
    assert torch.equal(outputs(reloaded, batch), fused)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("family, method, kind, seed", [c for c in CASES if c[1] != "svd"])
def test_lora_merged_equals_unmerged(family, method, kind, seed):
    peft = pytest.importorskip("peft", reason="LoRA needs the peft extra (make setup installs it)")
    from mlp_fusion.training.lora import add_lora

    model, batch = degenerate(family, kind, seed).float(), inputs(seed=seed)
    fuse(model, FusionConfig(method=method, ratio=0.5, seed=seed))
    wrapped = add_lora(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    unmerged = outputs(wrapped, batch)
    merged = outputs(wrapped.merge_and_unload(), batch)
    assert (merged - unmerged).abs().max() <= 1e-4 * (float(unmerged.abs().max()) + 1)


@pytest.mark.parametrize("family, method, kind, seed", CASES)
def test_streamed_compress_equals_in_memory(capsys, tmp_path, family, method, kind, seed):
    from mlp_fusion.cli import main

    degenerate(family, kind, seed).save_pretrained(tmp_path / "base")
    common = ["compress", str(tmp_path / "base"), "--method", method, "--ratio", "0.5", "--seed", str(seed)]
    for mode in ("streamed", "memory"):
        extra = ["--in-memory"] if mode == "memory" else []
        assert main([*common, *extra, "--out", str(tmp_path / mode)]) == 0, capsys.readouterr().err
    streamed = mlp_fusion.from_pretrained(tmp_path / "streamed").state_dict()  # tied weights under every name
    in_memory = mlp_fusion.from_pretrained(tmp_path / "memory").state_dict()
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[name], in_memory[name]) for name in streamed)

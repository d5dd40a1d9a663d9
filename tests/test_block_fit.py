"""Block reconstruction (``block_steps``): each fused layer fitted toward the original model's layer output."""

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import build, inputs, outputs

from mlp_fusion import FusionConfig, UserError, fuse
from mlp_fusion.parametrizations import NeuronScale


def calibration_batch():
    return inputs(seed=1, batch=16, length=12)


def scales(model):
    return [m.scale.clone() for m in model.modules() if isinstance(m, NeuronScale)]


def output_error(model, original, batch) -> float:
    ours, theirs = outputs(model, batch), outputs(original, batch)
    keep = batch["attention_mask"].bool()
    return float((ours[keep] - theirs[keep]).norm() / theirs[keep].norm())


@pytest.mark.parametrize(("family", "steps"), [("llama", 200), ("gemma3", 200), ("qwen2_moe", 40)])
def test_block_fit_brings_the_output_closer(family, steps):
    original, batch = build(family), calibration_batch()
    refitted, fitted = copy.deepcopy(original), copy.deepcopy(original)
    config = FusionConfig(ratio=0.25, keep_fraction=0.5)
    fuse(refitted, config, calibration=batch)
    lines = []
    fuse(fitted, replace(config, block_steps=steps), lines.append, calibration=batch)
    assert output_error(fitted, original, batch) < 0.99 * output_error(refitted, original, batch)
    assert output_error(fitted, original, inputs(seed=5, batch=8, length=12)) < output_error(
        refitted, original, inputs(seed=5, batch=8, length=12)
    )  # on inputs it was not fitted on too
    reported = [line.split() for line in lines if line.startswith("block fit of layer")]
    assert len(reported) == original.config.num_hidden_layers
    assert all(float(words[-1]) < float(words[-3]) for words in reported)  # each fit lowered its error
    # only the fused MLPs train: attention and norms are the original's
    fixed = {n: p for n, p in original.named_parameters() if ".mlp." not in n}
    assert all(torch.equal(p, dict(fitted.named_parameters())[n]) for n, p in fixed.items())


def test_block_fit_keeps_the_scales():
    """One fused layer (the same calibration inputs either way): the same scales, other MLP weights."""
    original, batch = build("llama"), calibration_batch()
    refitted, fitted = copy.deepcopy(original), copy.deepcopy(original)
    fuse(refitted, FusionConfig(ratio=0.5, layers="1"), calibration=batch)
    fuse(fitted, FusionConfig(ratio=0.5, layers="1", block_steps=20), calibration=batch)
    assert all(torch.equal(a, b) for a, b in zip(scales(refitted), scales(fitted)))
    weights = [(n, p) for n, p in fitted.named_parameters() if "layers.1.mlp" in n]
    assert weights and all(not torch.equal(p, dict(refitted.named_parameters())[n]) for n, p in weights)


def test_block_fit_targets_the_original_model_not_the_fused_prefix():
    """Fusing layers 0 and 1 with the fit at both, layer 1's fit aims at the original's output of layer 1,
    so it makes up for layer 0's loss: the fitted model ends closer than fitting each layer to its own MLP."""
    original, batch = build("llama"), calibration_batch()
    local, block = copy.deepcopy(original), copy.deepcopy(original)
    fuse(local, FusionConfig(ratio=0.25, reconstruct_steps=200), calibration=batch)
    fuse(block, FusionConfig(ratio=0.25, block_steps=200), calibration=batch)
    assert output_error(block, original, batch) < output_error(local, original, batch)


def test_block_fit_targets_are_the_original_models_layer_outputs(monkeypatch):
    import mlp_fusion.layer_runs as layer_runs

    original, batch = build("llama"), calibration_batch()
    seen = []

    def spy(runs, weights, steps, seed):
        seen.append([target for _, _, target in runs])
        return 0.0, 0.0

    monkeypatch.setattr(layer_runs, "fit_block", spy)
    # layer 1 is not fused: the walk runs the original's hidden states through it to reach layer 2
    fuse(copy.deepcopy(original), FusionConfig(ratio=0.25, layers="0,2", block_steps=1), calibration=batch)
    states = {}
    for index in (0, 2):
        original.model.layers[index].register_forward_hook(
            lambda module, args, out, index=index: states.update({index: out})
        )
    outputs(original, batch)
    keep = batch["attention_mask"].bool()
    assert len(seen) == 2
    for layer, targets in zip((0, 2), seen):
        assert torch.allclose(torch.cat(targets)[keep], states[layer][keep], atol=1e-5)


def test_block_fit_is_seeded():
    original, batch = build("llama"), calibration_batch()
    first, second = copy.deepcopy(original), copy.deepcopy(original)
    for model in (first, second):
        fuse(model, FusionConfig(ratio=0.5, block_steps=20), calibration=batch)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_block_fit_needs_one_list_of_layers_and_changes_nothing_when_refused():
    model = build("switch")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="block_steps"):
        fuse(model, FusionConfig(ratio=0.5, block_steps=5), calibration=calibration_batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_steps_must_be_a_whole_number_at_least_zero():
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="block_steps"):
            FusionConfig(block_steps=bad)


def test_block_fit_layer_by_layer_equals_in_memory(tmp_path):
    from mlp_fusion import from_pretrained
    from mlp_fusion.streaming import fuse_checkpoint

    build("llama").save_pretrained(tmp_path / "base")
    config = FusionConfig(ratio=0.5, layers="0,2", keep_fraction=0.5, block_steps=10)
    batch = calibration_batch()
    fuse_checkpoint(tmp_path / "base", tmp_path / "streamed", config, calibration=batch)
    in_memory = build("llama")
    fuse(in_memory, config, calibration=batch)
    streamed = from_pretrained(tmp_path / "streamed").state_dict()
    assert streamed.keys() == in_memory.state_dict().keys()
    assert all(torch.equal(streamed[k], v) for k, v in in_memory.state_dict().items())


def test_fitting_steps_without_calibration_are_refused_before_anything_changes(tmp_path, capsys):
    from mlp_fusion.cli import main

    model = build("llama")
    before = copy.deepcopy(model.state_dict())
    for field in ("block_steps", "reconstruct_steps"):
        with pytest.raises(UserError, match=f"{field} need calibration"):
            fuse(model, FusionConfig(ratio=0.5, **{field: 5}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # the save's own progress
    out = tmp_path / "fused"
    code = main(
        ["compress", str(tmp_path / "base"), "--recipe", "paper", "--block-steps", "5", "--out", str(out)]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and "block_steps need calibration" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()

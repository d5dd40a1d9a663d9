import pytest
import torch
from tiny_models import FAMILIES, build, inputs, outputs

import mlp_fusion
from mlp_fusion import FusionConfig, UserError, fuse
from mlp_fusion.parametrizations import NeuronScale, has_input_scales

peft = pytest.importorskip("peft", reason="LoRA tests need the peft extra (make setup installs it)")

from mlp_fusion.training.lora import LoraSettings, add_lora, merge_lora  # noqa: E402


def _trained_adapters(model, seed: int = 3) -> None:
    """Give every adapter non-zero B (PEFT starts B at zero, which would hide a wrong merge)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_keeps_the_outputs(family):
    model = build(family)
    fuse(model, FusionConfig(ratio=0.5))
    batch = inputs()
    wrapped = add_lora(model, LoraSettings(lora_rank=4).peft_config(None))
    _trained_adapters(wrapped)
    before = outputs(wrapped, batch)
    assert (before - outputs(model, batch)).abs().max() == 0  # the same modules inside
    merged = wrapped.merge_and_unload()
    assert (outputs(merged, batch) - before).abs().max() < 1e-5


def test_adapter_on_a_scaled_projection_has_the_fused_dynamics():
    """The adapter's delta is multiplied by the cluster sizes, like the stored weight's."""
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    down = model.model.layers[0].mlp.down_proj
    scale = down.parametrizations.weight[0].scale.reshape(-1).clone()
    assert not torch.allclose(scale, torch.ones_like(scale))
    wrapped = add_lora(model, LoraSettings(lora_rank=2, lora_targets="down_proj").peft_config(None))
    _trained_adapters(wrapped)
    layer = model.model.layers[0].mlp.down_proj
    hidden = torch.randn(3, scale.numel())
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight = layer.get_base_layer().weight
    expected = (hidden * scale) @ (weight + layer.scaling["default"] * b @ a).T
    assert torch.allclose(layer(hidden), expected, atol=1e-6)


def test_merged_model_saves_and_reloads_in_the_fused_format(tmp_path):
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5, layers="0"))
    wrapped = add_lora(model, LoraSettings(lora_rank=4).peft_config(None))
    _trained_adapters(wrapped)
    batch = inputs()
    expected = outputs(wrapped, batch)
    with pytest.raises(UserError, match="merge"):
        mlp_fusion.save_pretrained(model, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    merged = merge_lora(wrapped)
    assert not has_input_scales(merged)
    assert isinstance(merged.model.layers[0].mlp.down_proj.parametrizations.weight[0], NeuronScale)
    mlp_fusion.save_pretrained(merged, tmp_path / "merged")
    reloaded = mlp_fusion.from_pretrained(tmp_path / "merged")
    assert (outputs(reloaded, batch) - expected).abs().max() < 1e-5


def test_low_rank_sites_are_refused_as_targets():
    model = build("llama")
    fuse(model, FusionConfig(method="svd", ratio=0.5, layers="0"))
    with pytest.raises(UserError, match="svd"):
        add_lora(model, LoraSettings(lora_targets="down_proj").peft_config(None))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lora_rank=0), "rank"),
        (dict(lora_alpha=0.0), "alpha"),
        (dict(lora_dropout=1.0), "dropout"),
        (dict(lora_targets=" , "), "targets"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        LoraSettings(**options)

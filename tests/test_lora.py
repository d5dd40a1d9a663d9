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
    fused = outputs(model, batch)  # before peft wraps the model in place
    wrapped = add_lora(model, LoraSettings(lora_rank=4).peft_config(None))
    assert (outputs(wrapped, batch) - fused).abs().max() < 1e-5  # moving the scales kept the function
    _trained_adapters(wrapped)
    before = outputs(wrapped, batch)
    assert (before - fused).abs().max() > 1e-4  # the adapters now change the outputs
    merged = wrapped.merge_and_unload()
    assert (outputs(merged, batch) - before).abs().max() < 1e-5


def test_dora_on_a_fused_model_is_refused_and_leaves_it_unchanged():
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    batch = inputs()
    before = outputs(model, batch)
    with pytest.raises(UserError, match="DoRA"):
        add_lora(model, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not has_input_scales(model) and torch.equal(outputs(model, batch), before)


def _fused_llama(tmp_path, loaded: bool):
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5, layers="0"))
    if loaded:
        mlp_fusion.save_pretrained(model, tmp_path / "fused", overwrite=True)
        model = mlp_fusion.from_pretrained(tmp_path / "fused")
    return model


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("loaded", [False, True])
def test_peft_wrapping_a_fused_projection_directly_is_refused_before_any_forward(tmp_path, loaded, use_dora):
    """peft's merge would add the delta to a computed weight and lose it: refused at wrapping, so a merge
    that never ran a forward pass cannot slip through."""
    model = _fused_llama(tmp_path, loaded)
    config = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=use_dora)
    with pytest.raises(UserError, match="add_lora"):
        peft.get_peft_model(model, config)


def test_an_adapter_saved_from_add_lora_loads_exactly_with_load_lora_and_not_with_plain_peft(tmp_path):
    model = _fused_llama(tmp_path, loaded=False)
    batch = inputs()
    wrapped = add_lora(model, LoraSettings(lora_rank=4).peft_config(None))
    _trained_adapters(wrapped)
    trained = outputs(wrapped, batch)
    wrapped.save_pretrained(tmp_path / "adapter")
    fresh = _fused_llama(tmp_path, loaded=True)
    with pytest.raises(UserError, match="load_lora"):
        peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    fresh = _fused_llama(tmp_path, loaded=True)
    loaded = mlp_fusion.load_lora(fresh, tmp_path / "adapter")
    assert (outputs(loaded, batch) - trained).abs().max() < 1e-5
    merged = loaded.merge_and_unload()  # no forward pass in between would change this
    assert (outputs(merged, batch) - trained).abs().max() < 1e-5


def test_load_lora_refuses_a_missing_adapter_with_one_line(tmp_path):
    model = _fused_llama(tmp_path, loaded=False)
    with pytest.raises(UserError, match="cannot read the adapter"):
        mlp_fusion.load_lora(model, tmp_path / "nothing")
    assert not has_input_scales(model)


def test_peft_on_an_unfused_model_or_unfused_layers_is_untouched():
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5, layers="0"))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _trained_adapters(wrapped)
    before = outputs(wrapped, inputs())
    merged = wrapped.merge_and_unload()  # plain weights: peft's own merge is exact
    assert (outputs(merged, inputs()) - before).abs().max() < 1e-5


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

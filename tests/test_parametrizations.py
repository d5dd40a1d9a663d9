import torch
from tiny_models import build, inputs, outputs

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.parametrizations import has_input_scales, scales_to_inputs, scales_to_weights


def test_the_stored_weight_gets_the_scaled_gradient():
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    down = model.model.layers[0].mlp.down_proj
    down.weight.sum().backward()
    stored, scale = down.parametrizations.weight.original, down.parametrizations.weight[0].scale
    assert torch.allclose(stored.grad, scale.expand_as(stored))  # d(w * s)/dw = s


def test_scales_on_inputs_compute_the_same_and_come_back():
    model = build("gpt2")  # Conv1D: the neuron axis is the weight's first
    fuse(model, FusionConfig(ratio=0.5))
    batch = inputs()
    expected = outputs(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert scales_to_inputs(model)
    assert has_input_scales(model)
    assert torch.allclose(outputs(model, batch), expected, atol=1e-6)
    scales_to_weights(model)
    assert not has_input_scales(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

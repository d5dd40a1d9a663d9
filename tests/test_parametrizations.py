import torch
from tiny_models import build, inputs, outputs

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.parametrizations import NeuronScale, has_input_scales, scales_to_inputs, scales_to_weights


def _down(model):
    return model.model.layers[0].mlp.down_proj


def test_inference_keeps_the_scaled_weight_until_the_stored_one_changes():
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    down = _down(model)
    with torch.no_grad():
        first = down.weight
        assert down.weight is first  # computed once
        down.parametrizations.weight.original.mul_(2)  # an optimizer step, in place
        assert down.weight is not first
        assert torch.allclose(down.weight, 2 * first)
        again = down.weight
        down.parametrizations.weight[0].scale.mul_(3)
        assert torch.allclose(down.weight, 3 * again)


def test_training_computes_the_weight_afresh_and_keeps_no_copy():
    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    down = _down(model)
    with torch.no_grad():
        assert down.weight is not None
    scaling: NeuronScale = down.parametrizations.weight[0]
    assert scaling._cached is not None
    weight = down.weight  # grad enabled
    assert weight.requires_grad and scaling._cached is None
    weight.sum().backward()
    stored = down.parametrizations.weight.original
    assert torch.allclose(stored.grad, scaling.scale.expand_as(stored))  # d(w * s)/dw = s


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

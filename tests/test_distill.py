import copy

import pytest
import torch
from tiny_models import build

from mlp_fusion import FusionConfig, UserError, distill, fuse
from mlp_fusion.batches import micro_batches, probe_batch
from mlp_fusion.parametrizations import NeuronScale
from mlp_fusion.training.distill import hidden_state_error


@pytest.mark.parametrize("family", ["bert", "llama", "mixtral"])
def test_distillation_lowers_the_hidden_state_error_and_keeps_the_rest(family):
    original = build(family)
    fused = copy.deepcopy(original)
    fuse(fused, FusionConfig(ratio=0.25, layers=[1, 2]))
    batch = probe_batch(original, None, count=8)
    batch["attention_mask"][0, -4:] = 0
    batches = micro_batches(batch, 4)
    untouched = {
        n: p.detach().clone()
        for n, p in fused.named_parameters()
        if ".mlp" not in n and "intermediate" not in n and "output.dense" not in n
    }
    scales = [m.scale.clone() for m in fused.modules() if isinstance(m, NeuronScale)]
    result = distill(original, fused, batches, epochs=5, lr=1e-3)
    assert result["after"] < 0.8 * result["before"]
    assert result["after"] == pytest.approx(hidden_state_error(original, fused, batches))
    for name, value in fused.named_parameters():
        if name in untouched:
            assert torch.equal(value, untouched[name]), name
        assert value.requires_grad
    assert all(
        torch.equal(a, m.scale)
        for a, m in zip(scales, [m for m in fused.modules() if isinstance(m, NeuronScale)])
    )


def test_distilling_an_unfused_model_is_refused():
    model = build("bert")
    with pytest.raises(UserError, match="fuse it first"):
        distill(model, copy.deepcopy(model), micro_batches(probe_batch(model, None, count=2), 2))

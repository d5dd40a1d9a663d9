import pytest
import torch

from mlp_fusion import FusionConfig
from mlp_fusion.methods import METHODS, SubMlps
from mlp_fusion.methods.svd import matched_rank


def plain(width=12, dim=5, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SubMlps(
        [torch.randn(batch, width, dim + 1, generator=g)],
        torch.randn(batch, width, dim, generator=g),
        (True,),
    )


def gated(width=12, dim=5, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, width, dim, generator=g) for _ in range(2)]
    return SubMlps(inputs, torch.randn(batch, width, dim, generator=g), (False, False))


def run(method, sub, width, **options):
    return METHODS[method](sub, width, FusionConfig(method=method, width=width, **options))


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"svd"}))
@pytest.mark.parametrize("make", [plain, gated])
def test_shapes(method, make):
    sub = make()
    result = run(method, sub, 4)
    assert result.sub.width == 4
    assert [t.shape[-1] for t in result.sub.inputs] == [t.shape[-1] for t in sub.inputs]
    assert result.sub.output.shape == (sub.batch, 4, sub.output.shape[-1])


def test_fusion_scale_is_cluster_sizes():
    sub = plain(width=20)
    result = run("fusion", sub, 6)
    assert result.scale.shape == (1, 6)
    assert result.scale.sum() == 20 and result.scale.min() >= 1
    assert torch.equal(result.scale, result.scale.round())


def test_fold_puts_sizes_into_output_and_cluster_spreads_them():
    sub = plain(width=20)
    fused, folded, clustered = run("fusion", sub, 6), run("fold", sub, 6), run("cluster", sub, 6)
    sizes = fused.scale.unsqueeze(-1)
    torch.testing.assert_close(folded.sub.output, fused.sub.output * sizes)
    torch.testing.assert_close(folded.sub.inputs[0], fused.sub.inputs[0])
    torch.testing.assert_close(clustered.sub.inputs[0], fused.sub.inputs[0] * sizes.sqrt())
    torch.testing.assert_close(clustered.sub.output, fused.sub.output * sizes.sqrt())


def test_prune_keeps_highest_scores_in_order():
    sub = plain(width=10)
    scores = sub.inputs[0].norm(dim=-1) * sub.output.norm(dim=-1)
    keep = scores.topk(3, dim=-1).indices.sort().values[0]
    result = run("prune", sub, 3)
    torch.testing.assert_close(result.sub.output[0], sub.output[0, keep])


def test_sketch_keeps_top_neurons_exactly():
    sub = plain(width=16)
    result = run("sketch", sub, 8, keep_fraction=0.5)
    scores = sub.inputs[0].norm(dim=-1) * sub.output.norm(dim=-1)
    top = scores.topk(4, dim=-1).indices.sort().values[0]
    torch.testing.assert_close(result.sub.inputs[0][0, :4], sub.inputs[0][0, top])
    plain_sketch = run("sketch", sub, 8)
    assert not torch.allclose(plain_sketch.sub.inputs[0][0, :4], sub.inputs[0][0, top])


def test_svd_rank_matches_the_papers_budget():
    # d = 768, D = 3072, c = 768 with biases: the paper used rank 153.
    sub = SubMlps([torch.zeros(1, 3072, 769)], torch.zeros(1, 3072, 768), (True,))
    assert matched_rank(sub, 768) == 153
    result = run("svd", plain(width=12), 3)
    assert result.rank >= 1 and result.sub.width == 12

import math
from dataclasses import replace

import pytest
import torch

from mlp_fusion import FusionConfig
from mlp_fusion.methods import METHODS, SubMlps
from mlp_fusion.methods.mmd import median_bandwidth, squared_mmd
from mlp_fusion.methods.svd import matched_rank
from mlp_fusion.methods.symmetry import canonicalise


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


def neuron_outputs(sub, x, act):
    """Each sub-MLP's contribution ``[D, N, d_out]`` to the MLP's output on inputs ``x`` ``[N, d]``."""
    pieces = [
        t[0, :, : x.shape[1]] @ x.T + (t[0, :, -1:] if bias else 0)
        for t, bias in zip(sub.inputs, sub.has_bias)
    ]
    hidden = act(pieces[0]) * pieces[1] if len(pieces) == 2 else act(pieces[0])
    return hidden.unsqueeze(-1) * sub.output[0].unsqueeze(1)


@pytest.mark.parametrize(
    "symmetry, act",
    [("gated", torch.nn.functional.silu), ("homogeneous", torch.relu), ("none", torch.nn.functional.gelu)],
)
def test_canonical_form_keeps_every_sub_mlp_function(symmetry, act):
    sub = gated(batch=1) if symmetry == "gated" else plain()
    sub = sub.with_tensors(sub.inputs, sub.output)
    sub.symmetry = symmetry
    canonical, _ = canonicalise(sub)
    x = torch.randn(9, 5)
    torch.testing.assert_close(neuron_outputs(canonical, x, act), neuron_outputs(sub, x, act))
    last_in, out = canonical.inputs[-1].norm(dim=-1), canonical.output.norm(dim=-1)
    if symmetry == "none":
        assert torch.equal(canonical.rows(), sub.rows())
    else:
        torch.testing.assert_close(last_in, out)


@pytest.mark.parametrize("symmetry", ["gated", "homogeneous"])
def test_canonical_form_is_the_same_for_every_member_of_an_orbit(symmetry):
    sub = gated(batch=1) if symmetry == "gated" else plain()
    sub.symmetry = symmetry
    factor = torch.rand(1, sub.width, 1) * 3 + 0.2
    if symmetry == "gated":
        factor = factor * (torch.randint(0, 2, factor.shape) * 2.0 - 1)
    moved = sub.with_tensors([*sub.inputs[:-1], sub.inputs[-1] * factor], sub.output / factor)
    assert not torch.allclose(moved.rows(), sub.rows())
    torch.testing.assert_close(canonicalise(moved)[0].rows(), canonicalise(sub)[0].rows())


@pytest.mark.parametrize("make", [gated, plain])
def test_full_width_fusion_gives_back_the_original_tensors(make):
    sub = make()
    sub.symmetry = "gated" if len(sub.inputs) == 2 else "homogeneous"
    result = run("fusion", sub, sub.width)
    order = result.sub.output[..., 0].argsort(dim=-1)  # k-means may list the clusters in any order
    expected = sub.output[..., 0].argsort(dim=-1)
    got = result.sub.rows().gather(1, order.unsqueeze(-1).expand_as(result.sub.rows()))
    want = sub.rows().gather(1, expected.unsqueeze(-1).expand_as(sub.rows()))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["fusion", "fold", "cluster"])
@pytest.mark.parametrize("make", [gated, plain])
def test_kept_share_holds_the_top_scored_neurons_exactly(method, make):
    sub = make(width=20)
    result = run(method, sub, 8, keep_fraction=0.5)
    top = sub.neuron_scores().topk(4, dim=-1).indices.sort(dim=-1).values
    want = sub.rows().gather(1, top.unsqueeze(-1).expand(-1, -1, sub.rows().shape[-1]))
    torch.testing.assert_close(result.sub.rows()[:, :4], want)  # clusters of one: no scale to fold in
    plain_result = run(method, sub, 8)
    assert not torch.allclose(plain_result.sub.rows()[:, :4], want)


def test_kept_share_leaves_every_other_neuron_to_k_means():
    sub = gated(width=20)
    result = run("fusion", sub, 8, keep_fraction=0.5)
    assert torch.equal(result.scale[:, :4], torch.ones(sub.batch, 4))
    assert torch.equal(result.scale.sum(-1), torch.full((sub.batch,), 20.0))
    assert result.scale[:, 4:].min() >= 1
    full = run("fusion", sub, 20, keep_fraction=0.5)  # at full width every neuron is its own cluster
    assert sorted(full.sub.rows()[0].sum(-1).tolist()) == pytest.approx(
        sorted(sub.rows()[0].sum(-1).tolist())
    )


def test_cluster_on_gated_mlps_leaves_the_gate_alone():
    sub = gated(width=20)
    sub.symmetry = "gated"
    fused, clustered = run("fusion", sub, 6), run("cluster", sub, 6)
    root = fused.scale.unsqueeze(-1).sqrt()
    torch.testing.assert_close(clustered.sub.inputs[0], fused.sub.inputs[0])
    torch.testing.assert_close(clustered.sub.inputs[1], fused.sub.inputs[1] * root)
    torch.testing.assert_close(clustered.sub.output, fused.sub.output * root)


def test_sketch_draws_a_new_matrix_for_every_site():
    sub = plain(width=16)
    first = run("sketch", sub, 4)
    again = run("sketch", sub, 4)
    other_site = run("sketch", replace(sub, stream=1), 4)
    torch.testing.assert_close(first.sub.rows(), again.sub.rows())
    assert not torch.allclose(first.sub.rows(), other_site.sub.rows())


def direct_squared_mmd(x, y, bandwidth):
    """MMD^2 of two point sets, term by term (an independent formula)."""

    def mean_kernel(a, b):
        return sum(math.exp(-float(((p - q) ** 2).sum()) / bandwidth) for p in a for q in b) / (
            len(a) * len(b)
        )

    return mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)


def test_mmd_learns_vectors_closer_in_distribution_than_a_subset():
    sub = plain(width=30, dim=3)
    result = run("mmd", sub, 6)
    assert torch.equal(result.scale, torch.full((1, 6), 5.0))
    rows, learned = sub.rows()[0], result.sub.rows()[0]
    bandwidth = float(median_bandwidth(sub.rows(), torch.Generator().manual_seed(0)))
    subset = rows[torch.randperm(30, generator=torch.Generator().manual_seed(3))[:6]]
    assert direct_squared_mmd(rows, learned, bandwidth) < 0.5 * direct_squared_mmd(rows, subset, bandwidth)
    torch.testing.assert_close(
        float(squared_mmd(sub.rows(), result.sub.rows(), torch.tensor(bandwidth).view(1, 1, 1))),
        direct_squared_mmd(rows, learned, bandwidth),
        rtol=1e-4,
        atol=1e-6,
    )


def test_mmd_at_full_width_keeps_every_sub_mlp():
    sub = gated(width=10)
    result = run("mmd", sub, 10)
    assert torch.equal(result.scale, torch.ones(2, 10))
    torch.testing.assert_close(result.sub.rows(), sub.rows())

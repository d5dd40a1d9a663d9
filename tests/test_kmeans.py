import pytest
import torch

from mlp_fusion import KMeans, k_means


def blobs(seed=0, groups=5, per_group=20, dim=8):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(groups, dim, generator=generator) * 10
    truth = torch.arange(groups).repeat_interleave(per_group)
    points = centers[truth] + 0.01 * torch.randn(groups * per_group, dim, generator=generator)
    return points, truth


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_separated_clusters_and_exact_means():
    points, truth = blobs()
    result = k_means(points, 5, seed=0)
    assert same_partition(result.labels, truth)
    for j in range(5):
        members = points[result.labels == j]
        torch.testing.assert_close(result.centers[j], members.mean(0))
        assert result.counts[j] == len(members)


def test_deterministic_for_a_seed():
    x = torch.randn(200, 6)
    first, second = k_means(x, 12, seed=3), k_means(x, 12, seed=3)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.centers, second.centers)


def test_no_empty_cluster_with_duplicated_rows():
    # 30 rows but only 4 distinct values: asking for 10 clusters must still give 10 non-empty clusters.
    base = torch.randn(4, 3)
    x = base[torch.arange(30) % 4]
    result = k_means(x, 10, seed=0)
    assert result.counts.min() >= 1
    assert result.counts.sum() == 30
    assert torch.equal(torch.bincount(result.labels, minlength=10).to(result.counts.dtype), result.counts)


def test_identical_rows_are_fused_with_zero_inertia():
    base = torch.randn(6, 5)
    x = base[torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])]
    result = k_means(x, 6, seed=1)
    assert float(result.inertia) == pytest.approx(0.0, abs=1e-9)
    assert sorted(result.counts.tolist()) == [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]


def test_batched_matches_each_element_quality():
    x = torch.randn(3, 120, 5)
    batched = k_means(x, 8, seed=0)
    assert batched.centers.shape == (3, 8, 5) and batched.labels.shape == (3, 120)
    for b in range(3):
        alone = k_means(x[b], 8, seed=0)
        # Different random streams, so not identical, but the same quality.
        assert float(batched.inertia[b]) <= 1.1 * float(alone.inertia)
        recomputed = ((x[b] - batched.centers[b, batched.labels[b]]) ** 2).sum()
        assert float(recomputed) == pytest.approx(float(batched.inertia[b]), rel=1e-4)


def test_hartigan_never_worse_than_lloyd():
    x = torch.randn(300, 10)
    lloyd = k_means(x, 30, seed=0, hartigan_rounds=0)
    refined = k_means(x, 30, seed=0)
    assert float(refined.inertia) <= float(lloyd.inertia)


def test_estimator_twin_and_bad_arguments():
    x = torch.randn(50, 4)
    estimator = KMeans(5, seed=2).fit(x)
    assert torch.equal(estimator.labels_, k_means(x, 5, seed=2).labels)
    with pytest.raises(ValueError):
        k_means(x, 51)
    with pytest.raises(ValueError):
        k_means(x, 0)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        k_means(x, 5)


def test_matches_scikit_learn_on_random_data():
    sklearn = pytest.importorskip("sklearn.cluster")
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(0))
    ours = float(k_means(x, 20, seed=0).inertia)
    theirs = sklearn.KMeans(20, n_init=3, algorithm="lloyd", random_state=0).fit(x.numpy()).inertia_
    assert ours <= 1.01 * theirs


def test_a_large_common_offset_does_not_change_the_clustering():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(20, 4, generator=generator) * 0.001 + c for c in (0.0, 0.1, 0.2)])
    near = k_means(points, 3, seed=0)
    far = k_means(points + 1e3, 3, seed=0)  # float32 still holds the points to about 1e-4
    assert torch.equal(near.labels, far.labels)
    torch.testing.assert_close(far.centers - 1e3, near.centers, atol=1e-4, rtol=0)
    torch.testing.assert_close(far.inertia, near.inertia, rtol=0.1, atol=0)

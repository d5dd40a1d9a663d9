"""k-means based methods: the paper's fusion and the two ways of folding the cluster sizes into weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kmeans import KMeansResult, k_means
from .base import MethodResult, SubMlps, register

if TYPE_CHECKING:
    from ..config import FusionConfig


def cluster_sub_mlps(sub: SubMlps, width: int, config: FusionConfig) -> tuple[SubMlps, KMeansResult]:
    """k-means on the sub-MLP vectors; the centroids split back into pieces."""
    rows = sub.rows()
    result = k_means(
        rows,
        width,
        n_init=config.n_init,
        max_iter=config.max_iter,
        hartigan_rounds=config.hartigan_rounds,
        seed=config.seed,
    )
    return sub.from_rows(result.centers.to(rows.dtype)), result


@register("fusion", "k-means centroids with the cluster sizes as a fixed, separate scale (the paper)")
def fusion(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    return MethodResult(centroids, scale=result.counts, inertia=result.inertia)


@register("fold", "k-means centroids, cluster sizes folded into the output weights")
def fold(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    sizes = result.counts.to(centroids.output.dtype).unsqueeze(-1)
    return MethodResult(
        SubMlps(centroids.inputs, centroids.output * sizes, sub.has_bias), inertia=result.inertia
    )


@register("cluster", "k-means centroids, cluster sizes spread evenly over every projection (exact for ReLU)")
def cluster(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    # A plain MLP has two factors (in, out): sqrt(n) on each; a gated one three: n^(1/3) on each.
    factor = result.counts.to(centroids.output.dtype) ** (1.0 / (len(centroids.inputs) + 1))
    return MethodResult(centroids.map_rows(lambda t: t * factor.unsqueeze(-1)), inertia=result.inertia)

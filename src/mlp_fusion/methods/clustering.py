"""k-means based methods: the paper's fusion and the two ways of folding the cluster sizes into weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kmeans import KMeansResult, k_means
from .base import MethodResult, SubMlps, register
from .symmetry import canonicalise, restore

if TYPE_CHECKING:
    from ..config import FusionConfig


# The methods below: k-means on each expert's sub-MLPs on its own, so a layer's experts can be fused in chunks.
CLUSTERING_METHODS = ("fusion", "fold", "cluster")


def cluster_sub_mlps(sub: SubMlps, width: int, config: FusionConfig) -> tuple[SubMlps, KMeansResult]:
    """k-means on the sub-MLP vectors (canonical ones unless ``config.canonical`` is off); centroids split back."""
    factors, first_expert = None, sub.first_expert
    if config.canonical:
        sub, factors = canonicalise(sub)
    rows, layout = sub.rows(), sub.zeros(0)
    del sub  # the canonical copy, if any: k-means holds the rows alone, centred in place
    result = k_means(
        rows,
        width,
        n_init=config.n_init,
        max_iter=config.max_iter,
        hartigan_rounds=config.hartigan_rounds,
        seed=config.seed,
        copy_x=False,
        first_index=first_expert,
    )
    centroids = layout.from_rows(result.centers.to(rows.dtype))
    if factors is not None:
        centroids = restore(centroids, factors, result.labels)
    return centroids, result


@register("fusion", "k-means centroids with the cluster sizes as a fixed, separate scale (the paper)")
def fusion(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    return MethodResult(centroids, scale=result.counts, inertia=result.inertia)


@register("fold", "k-means centroids, cluster sizes folded into the output weights")
def fold(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    sizes = result.counts.to(centroids.output.dtype).unsqueeze(-1)
    return MethodResult(
        centroids.with_tensors(centroids.inputs, centroids.output * sizes), inertia=result.inertia
    )


@register(
    "cluster", "k-means centroids, sqrt(cluster size) folded into the last input and the output projection"
)
def cluster(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    centroids, result = cluster_sub_mlps(sub, width, config)
    # sqrt(n) on (w_in, b_in) and w_out, or on up and down of a gated MLP (never inside the gate's
    # activation): exact on n duplicated neurons when the activation is ReLU, and always when gated.
    root = result.counts.to(centroids.output.dtype).sqrt().unsqueeze(-1)
    inputs = [*centroids.inputs[:-1], centroids.inputs[-1] * root]
    return MethodResult(centroids.with_tensors(inputs, centroids.output * root), inertia=result.inertia)

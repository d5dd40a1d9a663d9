"""k-means based methods: the paper's fusion and the two ways of folding the cluster sizes into weights."""

from __future__ import annotations

import torch

from ..kmeans import k_means
from .base import MethodResult, MethodSettings, SubMlps, register
from .pruning import kept_count, split_top
from .symmetry import canonicalise, restore

# The methods below: k-means on each expert's sub-MLPs on its own, so a layer's experts can be fused in chunks.
CLUSTERING_METHODS = ("fusion", "fold", "cluster")  # kept for old imports: the registry's ``clusters`` trait


def cluster_sub_mlps(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    """Fusion's result: k-means centroids (of canonical sub-MLPs unless ``config.canonical`` is off) with
    the cluster sizes as their scale. With ``config.keep_fraction``, that share of the width goes to the
    top-scored neurons, kept exactly (clusters of one), and k-means fills the rest from the other neurons."""
    keep = kept_count(width, config.keep_fraction)
    if not keep:
        return _k_means_fusion(sub, width, config)
    kept, rest = split_top(sub, keep)
    fused = _k_means_fusion(rest, width - keep, config)
    ones = fused.scale.new_ones(sub.batch, keep)
    return MethodResult(kept.joined(fused.sub), torch.cat([ones, fused.scale], dim=1), inertia=fused.inertia)


def _k_means_fusion(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
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
    return MethodResult(centroids, scale=result.counts, inertia=result.inertia)


@register(
    "fusion", "k-means centroids with the cluster sizes as a fixed, separate scale (the paper)", clusters=True
)
def fusion(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    return cluster_sub_mlps(sub, width, config)


@register("fold", "k-means centroids, cluster sizes folded into the output weights", clusters=True)
def fold(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    fused = cluster_sub_mlps(sub, width, config)
    sizes = fused.scale.to(fused.sub.output.dtype).unsqueeze(-1)
    return MethodResult(
        fused.sub.with_tensors(fused.sub.inputs, fused.sub.output * sizes), inertia=fused.inertia
    )


@register(
    "cluster",
    "k-means centroids, sqrt(cluster size) folded into the last input and the output projection",
    clusters=True,
)
def cluster(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    fused = cluster_sub_mlps(sub, width, config)
    centroids = fused.sub
    # sqrt(n) on (w_in, b_in) and w_out, or on up and down of a gated MLP (never inside the gate's
    # activation): exact on n duplicated neurons when the activation is ReLU, and always when gated.
    root = fused.scale.to(centroids.output.dtype).sqrt().unsqueeze(-1)
    inputs = [*centroids.inputs[:-1], centroids.inputs[-1] * root]
    return MethodResult(centroids.with_tensors(inputs, centroids.output * root), inertia=fused.inertia)

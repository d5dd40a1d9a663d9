"""k-means in torch: greedy k-means++ start, Lloyd steps on matrix products, Hartigan refinement.

Lloyd stops in the first local optimum it meets; Hartigan moves (move a point when that lowers the total
inertia, counting how the two cluster means shift) escape most of them at the cost of a few more distance
matrices, which is why one restart here reaches a lower inertia than many plain Lloyd restarts.
Everything is batched over a leading axis, so all experts of a Mixture-of-Experts layer are clustered in
one pass; every tensor stays on the input's device, so the same code runs on CPU and CUDA. Every cluster
of the result is non-empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class KMeansResult:
    """Centers ``[B, k, p]``, labels ``[B, n]``, cluster sizes ``[B, k]`` (all >= 1), inertia ``[B]``."""

    centers: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor
    inertia: torch.Tensor
    n_iter: int


def k_means(
    x: torch.Tensor,
    n_clusters: int,
    *,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    hartigan_rounds: int = 50,
    seed: int = 0,
    copy_x: bool = True,
    first_index: int = 0,
) -> KMeansResult:
    """Cluster the rows of ``x`` (``[n, p]`` or a batch ``[B, n, p]``) into ``n_clusters`` groups.

    Runs ``n_init`` restarts and keeps, per batch element, the one with the lowest inertia. ``tol`` is
    relative to the mean per-feature variance of the data, as in scikit-learn. ``hartigan_rounds`` bounds
    the refinement after Lloyd (0 turns it off). With ``copy_x=False`` a float32 or float64 ``x`` is
    centred in place (left so), which saves one copy of the data.

    Batch element ``b`` draws its random numbers from its own generator, seeded ``seed + first_index + b``,
    so a batch clustered in chunks (``first_index`` = the chunk's start) gives exactly the same result.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"k_means expects a [n, p] or [B, n, p] tensor, got shape {tuple(x.shape)}")
    n = x.shape[1]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be between 1 and the number of rows ({n}), got {n_clusters}")
    if n_init < 1 or max_iter < 1 or hartigan_rounds < 0:
        raise ValueError("n_init and max_iter must be at least 1, hartigan_rounds at least 0")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not torch.isfinite(x).all():  # else seeding fails deep inside with a misleading message
        raise ValueError("k_means got NaN or infinite values; cluster finite rows")

    # Distances do not change under a common shift, but the expansion ||a||^2 - 2ab + ||b||^2 loses
    # precision when every row shares a large offset: cluster the centred rows, shift the centres back.
    offset = x.mean(dim=1, keepdim=True)
    x = x - offset if copy_x else x.sub_(offset)
    generators = [
        torch.Generator(device=x.device).manual_seed(seed + first_index + b) for b in range(x.shape[0])
    ]
    x_sq = (x * x).sum(-1)
    tol_abs = tol * x.var(dim=1, unbiased=False).mean(-1)

    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = _kmeans_plus_plus(x, x_sq, n_clusters, generators)
        result = _lloyd(x, x_sq, centers, max_iter, tol_abs)
        if hartigan_rounds:
            result = _hartigan(x, x_sq, result, hartigan_rounds)
        best = result if best is None else _keep_better(best, result)
    assert best is not None
    best.centers = best.centers + offset
    if squeeze:
        best = KMeansResult(best.centers[0], best.labels[0], best.counts[0], best.inertia[0], best.n_iter)
    return best


@dataclass
class KMeans:
    """Estimator twin of :func:`k_means` (same arguments); learned state ends in ``_`` as in scikit-learn."""

    n_clusters: int
    n_init: int = 1
    max_iter: int = 100
    tol: float = 1e-4
    hartigan_rounds: int = 50
    seed: int = 0

    def fit(self, x: torch.Tensor) -> KMeans:
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "n_clusters"}
        result = k_means(x, self.n_clusters, **options)
        self.cluster_centers_ = result.centers
        self.labels_ = result.labels
        self.counts_ = result.counts
        self.inertia_ = result.inertia
        self.n_iter_ = result.n_iter
        return self


def _squared_distances(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for batches ``a [B, m, p]`` and ``b [B, k, p]``, as ``[B, m, k]``."""
    b_sq = (b * b).sum(-1)
    return (a_sq.unsqueeze(-1) - 2 * torch.bmm(a, b.transpose(1, 2)) + b_sq.unsqueeze(1)).clamp_min_(0)


def _kmeans_plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generators: list[torch.Generator]
) -> torch.Tensor:
    """Greedy k-means++: at each step sample ``2 + log k`` candidates, keep the one that lowers the potential most."""
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    n_candidates = 2 + int(math.log(k))
    chosen = torch.empty(batch, k, dtype=torch.long, device=x.device)
    for b, generator in enumerate(generators):
        chosen[b, 0] = torch.randint(n, (1,), generator=generator, device=x.device)[0]
    closest = _squared_distances(x, x_sq, x[rows, chosen[:, 0]].unsqueeze(1)).squeeze(-1)  # [B, n]
    for step in range(1, k):
        weights = closest.clone()
        exhausted = weights.sum(-1) <= 0  # every point already coincides with a center
        weights[exhausted] = 1.0
        candidates = torch.cat(
            [
                torch.multinomial(weights[b : b + 1], n_candidates, replacement=True, generator=generator)
                for b, generator in enumerate(generators)
            ]
        )
        candidate_points = x[rows.unsqueeze(1), candidates]  # [B, L, p]
        distances = _squared_distances(x, x_sq, candidate_points).transpose(1, 2)  # [B, L, n]
        potentials = torch.minimum(distances, closest.unsqueeze(1))
        best = potentials.sum(-1).argmin(-1)  # [B]
        closest = potentials[rows, best]
        chosen[:, step] = candidates[rows, best]
    return x[rows.unsqueeze(1), chosen]


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int, tol_abs: torch.Tensor
) -> KMeansResult:
    k = centers.shape[1]
    labels = _squared_distances(x, x_sq, centers).argmin(-1)
    running = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # per element, as if clustered alone
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        new_centers, new_labels, counts = _centers_of(x, labels, k)
        shift = ((new_centers - centers) ** 2).sum((1, 2))
        centers = torch.where(running.view(-1, 1, 1), new_centers, centers)
        labels = torch.where(running.view(-1, 1), new_labels, labels)
        moved_labels = _squared_distances(x, x_sq, centers).argmin(-1)
        converged = (moved_labels == labels).all(-1) | (shift <= tol_abs)
        labels = torch.where(running.view(-1, 1), moved_labels, labels)
        running = running & ~converged
        if not bool(running.any()):
            break
    # Final step: centers are the exact means of the final labels (so identical members give their exact value).
    centers, labels, counts = _centers_of(x, labels, k)
    return KMeansResult(centers, labels, counts, _inertia(x, centers, labels), n_iter)


CHUNK_ELEMENTS = 1 << 22  # float64 working set of one chunk of rows: 32 MB


def _inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact inertia in float64, a bounded chunk of rows at a time (never a float64 copy of ``x``)."""
    step = max(1, CHUNK_ELEMENTS // x.shape[-1])
    values = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        for start in range(0, x.shape[1], step):
            rows = x[b, start : start + step].double()
            residual = rows - centers[b, labels[b, start : start + step]].double()
            values[b] += (residual * residual).sum()
    return values


def _hartigan(x: torch.Tensor, x_sq: torch.Tensor, start: KMeansResult, max_rounds: int) -> KMeansResult:
    """Move points to other clusters while that lowers the inertia, a round of moves at a time.

    Moving x from cluster a (size n_a) to b changes the inertia by
    ``n_b/(n_b+1) ||x - c_b||^2 - n_a/(n_a-1) ||x - c_a||^2``. Each round first tries every improving move
    at once; where that does not lower a batch element's inertia, it makes the best moves that touch
    disjoint clusters, whose gains add up exactly. A batch element stops when no move improves it.
    """
    k = start.centers.shape[1]
    total = x_sq.double().sum(-1)
    state = _with_fast_inertia(start, total)  # comparisons inside the loop use the fast formula throughout
    active = torch.ones_like(state.inertia, dtype=torch.bool)
    for _ in range(max_rounds):
        delta, target = _move_gains(x, x_sq, state)
        moves = (delta < 0) & active.unsqueeze(-1)
        has_moves = moves.any(-1)
        if not bool(has_moves.any()):
            break
        bold = _moved(x, total, state, torch.where(moves, target, state.labels), k)
        retry = has_moves & (bold.inertia >= state.inertia)
        if bool(retry.any()):
            safe_moves = _independent_moves(delta, target, state.labels, retry)
            safe = _moved(x, total, state, torch.where(safe_moves, target, state.labels), k)
            bold = _select(retry, safe, bold)
        improved = has_moves & (bold.inertia < state.inertia)
        active = active & improved
        state = _select(improved, bold, state)
    inertia = _inertia(x, state.centers, state.labels)
    return KMeansResult(state.centers, state.labels, state.counts, inertia, start.n_iter)


def _independent_moves(
    delta: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Per batch element in ``rows``: the best improving moves, no two touching the same cluster."""
    chosen = torch.zeros_like(delta, dtype=torch.bool)
    for b in torch.nonzero(rows).flatten().tolist():
        count = int((delta[b] < 0).sum())
        sources, targets = labels[b].tolist(), target[b].tolist()
        touched: set[int] = set()
        for i in delta[b].argsort()[:count].tolist():
            if sources[i] not in touched and targets[i] not in touched:
                touched.update((sources[i], targets[i]))
                chosen[b, i] = True
    return chosen


def _move_gains(
    x: torch.Tensor, x_sq: torch.Tensor, state: KMeansResult
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every point: the inertia change of its best move and the cluster it would move to."""
    distances = _squared_distances(x, x_sq, state.centers)  # [B, n, k]
    own_size = state.counts.gather(1, state.labels)
    own = distances.gather(2, state.labels.unsqueeze(-1)).squeeze(-1)
    removal_gain = own * own_size / (own_size - 1).clamp_min(1)
    addition_cost = distances * (state.counts / (state.counts + 1)).unsqueeze(1)
    addition_cost.scatter_(2, state.labels.unsqueeze(-1), float("inf"))
    best_cost, target = addition_cost.min(-1)
    delta = best_cost - removal_gain
    delta[own_size <= 1] = float("inf")  # never empty a cluster
    tiny = 1e-9 * state.inertia.unsqueeze(-1).to(delta.dtype)
    return torch.where(delta < -tiny, delta, torch.full_like(delta, float("inf"))), target


def _moved(
    x: torch.Tensor, total: torch.Tensor, state: KMeansResult, labels: torch.Tensor, k: int
) -> KMeansResult:
    centers, labels, counts = _centers_of(x, labels, k)
    return _with_fast_inertia(KMeansResult(centers, labels, counts, state.inertia, state.n_iter), total)


def _with_fast_inertia(state: KMeansResult, total: torch.Tensor) -> KMeansResult:
    """Inertia from ``sum ||x||^2 - sum_j n_j ||c_j||^2`` (exact when every center is its cluster's mean)."""
    center_sq = (state.centers.double() ** 2).sum(-1)
    inertia = total - (state.counts.double() * center_sq).sum(-1)
    return KMeansResult(state.centers, state.labels, state.counts, inertia, state.n_iter)


def _centers_of(
    x: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster means for ``labels``; an empty cluster takes over the point farthest from its own center."""
    counts = _counts(labels, k, x.dtype)
    if bool((counts == 0).any()):
        labels = _reseed_empty(x, labels, counts, k)
        counts = _counts(labels, k, x.dtype)
    return _sums(x, labels, k) / counts.unsqueeze(-1), labels, counts


def _sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows ``[B, k, p]``; ``index_add_`` needs no ``[B, n, p]`` index tensor."""
    sums = torch.zeros(x.shape[0], k, x.shape[2], dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        sums[b].index_add_(0, labels[b], x[b])
    return sums


def _counts(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    counts = torch.zeros(labels.shape[0], k, dtype=dtype, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=dtype))


def _reseed_empty(x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    labels = labels.clone()
    means = _sums(x, labels, k) / counts.clamp_min(1).unsqueeze(-1)
    for b in torch.nonzero((counts == 0).any(-1)).flatten().tolist():
        own = ((x[b] - means[b, labels[b]]) ** 2).sum(-1)
        sizes = counts[b].clone()
        order = own.argsort(descending=True).tolist()
        for empty in torch.nonzero(sizes == 0).flatten().tolist():
            for i in order:
                if sizes[labels[b, i]] > 1:
                    sizes[labels[b, i]] -= 1
                    labels[b, i] = empty
                    sizes[empty] = 1
                    break
    return labels


def _keep_better(old: KMeansResult, new: KMeansResult) -> KMeansResult:
    return _select(new.inertia < old.inertia, new, old)


def _select(pick: torch.Tensor, new: KMeansResult, old: KMeansResult) -> KMeansResult:
    """Per batch element, ``new`` where ``pick`` is true, else ``old``."""
    return KMeansResult(
        centers=torch.where(pick.view(-1, 1, 1), new.centers, old.centers),
        labels=torch.where(pick.view(-1, 1), new.labels, old.labels),
        counts=torch.where(pick.view(-1, 1), new.counts, old.counts),
        inertia=torch.where(pick, new.inertia, old.inertia),
        n_iter=max(old.n_iter, new.n_iter),
    )

"""One representative per symmetry orbit of a sub-MLP, so that k-means compares functions, not parametrisations.

A gated sub-MLP ``act(g.x) (u.x) d`` computes the same thing after ``(u, d) -> (a u, d / a)`` for any real
``a != 0``; a plain sub-MLP with a positively homogeneous activation (ReLU) after
``(w_in, b_in, w_out) -> (a w_in, a b_in, w_out / a)`` for ``a > 0``. Raw k-means ignores this: copies of
one function can sit far apart and get averaged into something else. :func:`canonicalise` balances the
two norms (``||u|| = ||d||``) and, for gated MLPs, points every ``u`` to the same side of the principal
direction of the ``u`` rows. Every canonical sub-MLP computes exactly what the original one did, and so
does every centroid of canonical rows; :func:`restore` then moves each centroid along its own orbit back to
the scale of its members, because the Adam kernel, unlike the function, depends on the parametrisation.
"""

from __future__ import annotations

import torch

from .base import SubMlps

SYMMETRIES = ("gated", "homogeneous", "none")
_POWER_STEPS = 30


def canonicalise(sub: SubMlps) -> tuple[SubMlps, torch.Tensor | None]:
    """The same sub-MLPs, each replaced by the representative of its symmetry orbit, and the factors used.

    Row ``i`` of the last input projection was multiplied by ``factors[:, i]`` (``[B, D, 1]``, float64;
    negative where a gated neuron was flipped, 1 for a neuron with a zero row) and its output row
    divided by it. ``None`` when the sub-MLPs have no symmetry.
    """
    if sub.symmetry == "none":
        return sub, None
    if sub.symmetry not in SYMMETRIES:
        raise ValueError(f"unknown symmetry {sub.symmetry!r}: expected one of {SYMMETRIES}")
    factors = _balancing_factors(sub.inputs[-1], sub.output)
    if sub.symmetry == "gated":
        factors = factors * _principal_side(sub.inputs[-1].double() * factors)
    return _move(sub, factors), factors


def restore(centroids: SubMlps, factors: torch.Tensor, labels: torch.Tensor) -> SubMlps:
    """Move each canonical centroid back toward its members' own parametrisation (same function).

    Centroid j is divided by the geometric mean of its members' factors, signed by their majority, so a
    cluster of one gets its original tensors back and a cluster of exact copies keeps their scale; the
    gradients, and so the Adam kernel, of the fused model then match the original's there.
    """
    width = centroids.width
    alive = factors != 0
    log_size = torch.where(alive, factors.abs().clamp_min(1e-300).log(), 0.0).squeeze(-1)
    sign = torch.where(alive, factors.sign(), 0.0).squeeze(-1)
    zeros = log_size.new_zeros(log_size.shape[0], width)
    members = zeros.scatter_add(1, labels, alive.squeeze(-1).double())
    mean_log = zeros.scatter_add(1, labels, log_size) / members.clamp_min(1)
    votes = zeros.scatter_add(1, labels, sign)
    cluster_factors = (torch.where(votes < 0, -1.0, 1.0) * mean_log.exp()).unsqueeze(-1)
    return _move(centroids, 1.0 / cluster_factors)


def _balancing_factors(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``a_i > 0`` with ``||a_i f_i|| = ||s_i / a_i||``; 1 where either row is zero.

    Such a neuron computes nothing now, but the non-zero row still receives gradient through the zero one;
    no factor balances the pair, and a factor of 0 would zero both rows and so remove that gradient for good.
    """
    first_norm = first.double().norm(dim=-1, keepdim=True)
    second_norm = second.double().norm(dim=-1, keepdim=True)
    alive = (first_norm > 0) & (second_norm > 0)
    return torch.where(alive, (second_norm / first_norm.clamp_min(1e-300)).sqrt(), 1.0)


def _move(sub: SubMlps, factors: torch.Tensor) -> SubMlps:
    """``(u, d) -> (f u, d / f)`` row by row; a zero factor zeroes both rows."""
    inverse = torch.where(factors == 0, 0.0, 1.0 / torch.where(factors == 0, 1.0, factors))
    last, output = sub.inputs[-1], sub.output
    moved_last = (last.double() * factors.to(last.device)).to(last.dtype)
    moved_output = (output.double() * inverse.to(output.device)).to(output.dtype)
    return sub.with_tensors([*sub.inputs[:-1], moved_last], moved_output)


def _principal_side(rows: torch.Tensor) -> torch.Tensor:
    """``[B, D, 1]`` signs (float64) that put every row on the positive side of the rows' principal direction.

    The direction is the top right singular vector of the ``[D, p]`` matrix, by power iteration from a fixed
    start; it does not change when rows flip sign, so rows equal up to sign land on the same side.
    """
    work = rows.double()
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(work.shape[-1], 1, generator=generator, dtype=torch.float64)  # one for every expert,
    direction = start.to(work.device).expand(work.shape[0], -1, -1)  # so a chunk of experts starts the same
    for _ in range(_POWER_STEPS):
        direction = work.transpose(1, 2) @ (work @ direction)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    side = work @ direction
    return torch.where(side < 0, -1.0, 1.0)

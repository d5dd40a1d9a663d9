"""Per-site widths from one parameter budget: spend the kept parameters where fusion loses least.

Planning only: from a sensitivity curve per site (error against width) to one width per site, before any
site is touched. Widths in between the grid points are interpolated linearly. Two curves:
- data-free: the k-means inertia of the site's sub-MLP vectors (canonical ones unless ``canonical`` is
  off), in weight units;
- with calibration inputs: the squared error the clustering causes in the MLP's output on those tokens,
  in the units of the residual stream every site writes into, so sites compare directly
  (:func:`output_error`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .errors import UserError
from .kmeans import k_means
from .methods import SubMlps
from .methods.symmetry import canonicalise

GRID = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
CURVE_ITERATIONS = 20  # a rough curve is enough to rank sites; the fusion itself runs to convergence


@dataclass
class WidthCurve:
    """Error (summed over a site's batch elements) at increasing widths; the last width is the full one."""

    widths: list[int]
    errors: list[float]
    neuron_cost: int  # parameters per neuron of the site, every expert counted

    def error(self, width: int) -> float:
        for (w0, e0), (w1, e1) in zip(zip(self.widths, self.errors), zip(self.widths[1:], self.errors[1:])):
            if w0 <= width <= w1:
                return e0 + (e1 - e0) * (width - w0) / max(w1 - w0, 1)
        return self.errors[0] if width < self.widths[0] else self.errors[-1]


def width_curve(
    sub: SubMlps, canonical: bool, seed: int, hidden: list[torch.Tensor] | None = None
) -> WidthCurve:
    """Error of quick k-means runs at the grid widths (0 at the full width), made non-increasing: their
    inertia, or with ``hidden`` (each batch element's hidden activations on calibration tokens, ``[n, D]``)
    the output error :func:`output_error` gives for their clusters."""
    factors = None
    if canonical:
        sub, factors = canonicalise(sub)
    rows, full = sub.rows(), sub.width
    widths = sorted({1, full, *(max(1, round(full * r)) for r in GRID)})
    grams = None if hidden is None else _activation_grams(hidden, factors)
    errors = []
    for width in widths:
        if width == full:
            errors.append(0.0)
            continue
        result = k_means(rows, width, max_iter=CURVE_ITERATIONS, hartigan_rounds=0, seed=seed)
        if grams is None:
            errors.append(float(result.inertia.sum()))
        else:
            errors.append(_output_errors(grams, sub.output, result.labels, width))
    errors = torch.tensor(errors).flip(0).cummax(0).values.flip(0).tolist()
    return WidthCurve(widths, errors, sub.batch * sub.row_length)


def _activation_grams(hidden: list[torch.Tensor], factors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each batch element's ``H^T H`` over its calibration tokens, in float64 (None for an expert no token
    reached). Every width's output error is a quadratic form in it, so the tokens are passed once per site
    rather than once per width. Canonical factors scale each neuron's activation as they scale its last
    input row (and divide its output row)."""
    grams = []
    for b, h in enumerate(hidden):
        if not len(h):
            grams.append(None)
            continue
        h = (h if factors is None else h * factors[b, :, 0].to(h)).double()
        grams.append(h.T @ h)
    return grams


def _output_errors(
    grams: list[torch.Tensor | None], output: torch.Tensor, labels: torch.Tensor, width: int
) -> float:
    """:func:`output_error` summed over batch elements; an expert no calibration token reached adds nothing."""
    return sum(output_error(g, output[b], labels[b], width) for b, g in enumerate(grams) if g is not None)


def output_error(gram: torch.Tensor, output: torch.Tensor, labels: torch.Tensor, clusters: int) -> float:
    """Squared error, summed over tokens, of an MLP output ``sum_i h_i d_i`` when each cluster's neurons are
    replaced by their mean neuron taken as many times, from the Gram matrix ``gram = H^T H [D, D]`` of the
    hidden activations and the output rows ``output [D, d_out]``.

    The fused output is ``sum_c (sum_{i in c} h_i) d_c`` with ``d_c`` the cluster's mean output row, so the
    error is ``|| sum_i h_i (d_i - d_c) ||^2 = trace(S^T gram S)`` with ``S`` the rows centred within their
    clusters. Exact when the hidden activations are linear in the neuron's weights (the mean neuron's
    activation is then the mean activation); to first order otherwise.
    """
    d = output.to(gram)
    sums = torch.zeros(clusters, d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, labels, d)
    counts = torch.bincount(labels, minlength=clusters).clamp_min(1).to(d).unsqueeze(1)
    spread = d - (sums / counts)[labels]
    return float(((gram @ spread) * spread).sum())


SPREAD = 2  # a site's width stays within this factor of the width one uniform ratio would give it


def allocate_widths(curves: list[WidthCurve], budget: int, ratio: float | None = None) -> list[int]:
    """Widths with ``sum(width x neuron_cost) <= budget`` that greedily minimise the summed error.

    Every site starts at its floor (one neuron; with ``ratio``, the uniform width ``ratio x D`` divided by
    :data:`SPREAD`) and may grow to its cap (``D``; with ``ratio``, the uniform width times SPREAD).
    Neurons are added one at a time where the error falls most per parameter, until no site below its cap
    can take another neuron within the budget. The band keeps one rough error curve from emptying a layer
    whose errors would only show in the layers after it.
    """
    floors = [_bounded(curve, ratio, 1 / SPREAD) if ratio else 1 for curve in curves]
    caps = [_bounded(curve, ratio, SPREAD) if ratio else curve.widths[-1] for curve in curves]
    widths = list(floors)
    spent = sum(w * curve.neuron_cost for w, curve in zip(widths, curves))
    if spent > budget:
        raise UserError(
            f"a budget of {budget:,} parameters cannot keep every chosen MLP at its smallest width "
            f"({spent:,} parameters): raise the budget or choose fewer layers"
        )
    heap = [(-_gain(curves[i], widths[i]), i) for i in range(len(curves)) if widths[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        _, index = heapq.heappop(heap)
        curve = curves[index]
        if spent + curve.neuron_cost > budget:
            continue  # this site can never grow again: the remaining budget only shrinks
        widths[index] += 1
        spent += curve.neuron_cost
        if widths[index] < caps[index]:
            heapq.heappush(heap, (-_gain(curve, widths[index]), index))
    return widths


def _bounded(curve: WidthCurve, ratio: float, factor: float) -> int:
    full = curve.widths[-1]
    return min(full, max(1, round(ratio * full * factor)))


def _gain(curve: WidthCurve, width: int) -> float:
    return (curve.error(width) - curve.error(width + 1)) / curve.neuron_cost

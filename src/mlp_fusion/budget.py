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
    errors = []
    for width in widths:
        if width == full:
            errors.append(0.0)
            continue
        result = k_means(rows, width, max_iter=CURVE_ITERATIONS, hartigan_rounds=0, seed=seed)
        if hidden is None:
            errors.append(float(result.inertia.sum()))
        else:
            errors.append(_output_errors(hidden, factors, sub.output, result.labels, width))
    errors = torch.tensor(errors).flip(0).cummax(0).values.flip(0).tolist()
    return WidthCurve(widths, errors, sub.batch * sub.row_length)


def _output_errors(
    hidden: list[torch.Tensor],
    factors: torch.Tensor | None,
    output: torch.Tensor,
    labels: torch.Tensor,
    width: int,
) -> float:
    """:func:`output_error` summed over batch elements; canonical factors scale each neuron's activation as
    they scale its last input row (and divide its output row)."""
    total = 0.0
    for b, h in enumerate(hidden):
        if len(h):  # an expert no calibration token reached adds nothing
            h = h if factors is None else h * factors[b, :, 0].to(h)
            total += output_error(h, output[b], labels[b], width)
    return total


def output_error(hidden: torch.Tensor, output: torch.Tensor, labels: torch.Tensor, clusters: int) -> float:
    """Squared error, summed over tokens, of an MLP output ``sum_i h_i d_i`` when each cluster's neurons are
    replaced by their mean neuron taken as many times: ``|| sum_i (h_i - h_c) (d_i - d_c)^T ||^2`` with
    ``h_c``, ``d_c`` the cluster means of the hidden activations ``hidden [n, D]`` and output rows
    ``output [D, d_out]``. Exact when the hidden activations are linear in the neuron's weights (the mean
    neuron's activation is then the mean activation); to first order otherwise.
    """
    h, d = hidden.double(), output.double()
    members = torch.zeros(clusters, len(labels), dtype=torch.float64, device=h.device)
    members[labels, torch.arange(len(labels), device=h.device)] = 1.0
    counts = members.sum(1, keepdim=True).clamp_min(1)
    h_spread = h - (h @ members.T / counts.T)[:, labels]
    d_spread = d - (members @ d / counts)[labels]
    return float((h_spread @ d_spread).pow(2).sum())


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

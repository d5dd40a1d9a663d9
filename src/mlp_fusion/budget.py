"""Per-site widths from one parameter budget: spend the kept parameters where fusion loses least.

Planning only: from a sensitivity curve per site (error against width) to one width per site, before any
site is touched. The curve is data-free: the k-means inertia of the site's sub-MLP vectors (canonical ones
unless ``canonical`` is off) at a grid of widths, in weight units, so that sites writing into the same
residual stream compare directly. Widths in between are interpolated linearly.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

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


def width_curve(sub: SubMlps, canonical: bool, seed: int) -> WidthCurve:
    """Inertia of quick k-means runs at the grid widths (0 at the full width), made non-increasing."""
    rows = (canonicalise(sub)[0] if canonical else sub).rows()
    full = sub.width
    widths = sorted({1, full, *(max(1, round(full * r)) for r in GRID)})
    errors = []
    for width in widths:
        if width == full:
            errors.append(0.0)
            continue
        result = k_means(rows, width, max_iter=CURVE_ITERATIONS, hartigan_rounds=0, seed=seed)
        errors.append(float(result.inertia.sum()))
    errors = torch.tensor(errors).flip(0).cummax(0).values.flip(0).tolist()
    cost = sub.batch * (sum(t.shape[-1] for t in sub.inputs) + sub.output.shape[-1])
    return WidthCurve(widths, errors, cost)


def allocate_widths(curves: list[WidthCurve], budget: int) -> list[int]:
    """Widths with ``sum(width x neuron_cost) <= budget`` that greedily minimise the summed error.

    Every site keeps at least one neuron. Neurons are added one at a time where the error falls most per
    parameter, until no site that is not yet full can take another neuron within the budget.
    """
    widths = [1] * len(curves)
    spent = sum(curve.neuron_cost for curve in curves)
    if spent > budget:
        raise ValueError(f"a budget of {budget} parameters cannot keep one neuron per site ({spent})")
    heap = [(-_gain(curve, 1), index) for index, curve in enumerate(curves) if curve.widths[-1] > 1]
    heapq.heapify(heap)
    while heap:
        _, index = heapq.heappop(heap)
        curve = curves[index]
        if spent + curve.neuron_cost > budget:
            continue  # this site can never grow again: the remaining budget only shrinks
        widths[index] += 1
        spent += curve.neuron_cost
        if widths[index] < curve.widths[-1]:
            heapq.heappush(heap, (-_gain(curve, widths[index]), index))
    return widths


def _gain(curve: WidthCurve, width: int) -> float:
    return (curve.error(width) - curve.error(width + 1)) / curve.neuron_cost

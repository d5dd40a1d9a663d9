"""Low-rank baseline: keep the width, replace every weight matrix by a rank-r factorisation.

r is chosen so that the MLP's parameter count matches what fusion would have at the requested width
(for d = 768, D = 3072, c = 768 that is r = 153, the paper's choice).
"""

from __future__ import annotations

from .base import MethodResult, MethodSettings, SubMlps, register


def matched_rank(sub: SubMlps, width: int) -> int:
    """The largest rank whose factorised MLP has no more parameters than a fused MLP of ``width`` neurons."""
    full_width = sub.width
    row_length = sum(t.shape[-1] for t in sub.inputs) + sub.output.shape[-1]
    biases = sum(sub.has_bias) * full_width
    matrix_sides = sum(t.shape[-1] - b for t, b in zip(sub.inputs, sub.has_bias)) + sub.output.shape[-1]
    per_rank = full_width * (len(sub.inputs) + 1) + matrix_sides
    rank = (width * row_length - biases) // per_rank
    return max(1, min(rank, full_width, min(t.shape[-1] for t in sub.inputs), sub.output.shape[-1]))


@register(
    "svd",
    "keep the width, factorise each weight matrix at the rank that matches fusion's parameters",
    exact_at_full_width=False,  # the matched rank stays below full rank
)
def svd(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    return MethodResult(sub, rank=matched_rank(sub, width))

"""Random Gaussian sketch of the neuron axis, optionally keeping the top-scored neurons exactly."""

from __future__ import annotations

import torch

from .base import MethodResult, MethodSettings, SubMlps, register
from .pruning import kept_count, split_top


@register(
    "sketch",
    "Gaussian sketch S (D x c, N(0, 1/c)): W_in' = S^T W_in, W_out' = W_out S",
    exact_at_full_width=False,  # a random projection even at full width
)
def sketch(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    keep = kept_count(width, config.keep_fraction)
    kept, rest = split_top(sub, keep) if keep else (None, sub)
    columns = width - keep
    # A different matrix for every site: the same one everywhere would correlate the layers' errors.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + sub.stream)
    projection = torch.randn(sub.batch, rest.width, columns, generator=generator) / columns**0.5
    projection = projection.to(device=sub.output.device, dtype=sub.output.dtype)
    sketched = rest.map_rows(lambda t: projection.transpose(1, 2) @ t)
    return MethodResult(kept.joined(sketched) if keep else sketched)

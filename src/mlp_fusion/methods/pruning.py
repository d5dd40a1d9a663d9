"""Structured magnitude pruning: keep the neurons with the largest ``||w_in_i|| * ||w_out_i||``."""

from __future__ import annotations

import torch

from .base import MethodResult, MethodSettings, SubMlps, register


def top_neurons(sub: SubMlps, count: int) -> torch.Tensor:
    """Indices ``[B, count]`` of the highest-scoring neurons, in their original order."""
    return sub.neuron_scores().topk(count, dim=-1).indices.sort(dim=-1).values


def gather_neurons(sub: SubMlps, index: torch.Tensor) -> SubMlps:
    return sub.map_rows(lambda t: t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1])))


def kept_count(width: int, fraction: float) -> int:
    """How many of ``width`` neurons ``keep_fraction`` keeps exactly; at least one is left to the method."""
    return min(width - 1, round(fraction * width)) if fraction > 0 else 0


def split_top(sub: SubMlps, count: int) -> tuple[SubMlps, SubMlps]:
    """The ``count`` highest-scoring neurons and the rest, each in their original order."""
    order = sub.neuron_scores().argsort(dim=-1, descending=True, stable=True)
    top, rest = order[:, :count].sort(dim=-1).values, order[:, count:].sort(dim=-1).values
    return gather_neurons(sub, top), gather_neurons(sub, rest)


@register("prune", "keep the neurons with the largest ||w_in|| * ||w_out||, drop the rest")
def prune(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    return MethodResult(gather_neurons(sub, top_neurons(sub, width)))

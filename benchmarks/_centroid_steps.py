"""A lead for healing, measured before anything is built into `compress`: even steps for fused neurons.

A fused neuron that stands for n neurons carries a fixed scale n on its output weights. AdamW moves every
stored weight by about the rate per step whatever its gradient, so that neuron's output moves n times as far
as a single neuron's: the training dynamics fusion keeps on purpose for fine-tuning (METHOD.md, section 3),
and perhaps too coarse for distillation toward the original, where healed fused models stop improving after
100 steps and pruned ones do not. :func:`even_centroid_steps` divides each step of a fused neuron's stored
weights by its scale (as AdamW on the weights with the scales folded in would move them), so that every
neuron's output moves alike; the scales themselves stay fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from mlp_fusion.families import find_sites
from mlp_fusion.records import fusion_records
from mlp_fusion.sites import LinearMlp


def centroid_divisors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every stored weight of a fused MLP with a fixed scale, paired with that scale shaped along the weight's
    neuron axis (a one-expert dense MLP only: what the healing benchmark fuses)."""
    fused = {record.name for record in fusion_records(model)}
    pairs = []
    for site in find_sites(model):
        if site.name not in fused:
            continue
        if not isinstance(site, LinearMlp):
            raise ValueError(f"{site.name}: even centroid steps are written for dense MLPs only")
        (output,) = [slot for slot in site.slots() if slot.role == "output"]
        if not parametrize.is_parametrized(output.module, output.attr):
            continue  # pruned: no scale
        scale = output.module.parametrizations[output.attr][0].scale.reshape(-1)
        for slot in site.slots():
            chains = getattr(slot.module, "parametrizations", {})
            stored = chains[slot.attr].original if slot.attr in chains else getattr(slot.module, slot.attr)
            shape = [1] * stored.dim()
            shape[slot.neuron_axis] = -1
            pairs.append((stored, scale.reshape(shape)))
    return pairs


def even_centroid_steps(model: nn.Module) -> Callable[[int], None]:
    """A hook to call after every optimizer step: it divides that step of each fused neuron's stored weights
    by the neuron's scale (a neuron kept as it was has scale 1 and keeps its step)."""
    pairs = centroid_divisors(model)
    if not pairs:
        raise ValueError("the model has no fused neuron with a scale")
    before = [stored.detach().clone() for stored, _ in pairs]

    def after_step(step: int) -> None:
        with torch.no_grad():
            for (stored, divisor), old in zip(pairs, before, strict=True):
                stored.sub_(old).div_(divisor).add_(old)
                old.copy_(stored)

    return after_step

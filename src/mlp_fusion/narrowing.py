"""Writing a method's result into a site: narrower tensors, plus the fixed scale or the low-rank factors."""

from __future__ import annotations

import torch

from .methods import MethodResult
from .parametrizations import LowRank, NeuronScale, parametrize_weight
from .sites import MlpSite, StackedExperts, WeightSlot


def apply_result(site: MlpSite, result: MethodResult) -> None:
    """Write ``result`` into ``site``'s modules in place."""
    site.write(result.sub)
    if result.scale is not None:
        attach_scale(site, result.scale)
    if result.rank is not None:
        attach_low_rank(site, result.rank)


def attach_scale(site: MlpSite, scale: torch.Tensor) -> None:
    """Register a :class:`NeuronScale` on every output weight; ``scale`` is ``[B, width]``."""
    for slot in site.slots():
        if slot.role == "output":
            values = scale if slot.expert is None else scale[slot.expert]
            weight = getattr(slot.module, slot.attr)
            shaped = values.to(device=weight.device, dtype=torch.float32).reshape(_scale_shape(slot, weight))
            parametrize_weight(slot.module, slot.attr, NeuronScale(shaped.clone()))


def attach_low_rank(site: MlpSite, rank: int, *, decompose: bool = True) -> None:
    """Replace every weight of ``site`` by a rank-``rank`` factorisation: the truncated SVD of the current
    weight, or (``decompose=False``, for factors about to be loaded) empty factors of the right shapes."""
    for slot in site.slots():
        parametrize_weight(slot.module, slot.attr, LowRank(rank, decompose=decompose))


def use_compatible_experts_kernel(model: torch.nn.Module, sites: list[MlpSite]) -> None:
    """Fall back to the eager experts loop when a stacked-experts width breaks grouped_mm's 16-byte alignment."""
    for site in sites:
        if isinstance(site, StackedExperts):
            itemsize = site.module.down_proj.element_size()
            if (site.width * itemsize) % 16 and hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation("eager")
                return


def _scale_shape(slot: WeightSlot, weight: torch.Tensor) -> list[int]:
    shape = [1] * weight.dim()
    shape[slot.neuron_axis] = weight.shape[slot.neuron_axis]
    if slot.expert is None and weight.dim() == 3:
        shape[0] = weight.shape[0]
    return shape

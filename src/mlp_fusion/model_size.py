"""A whole-model size target (``size``: the fraction of the model's parameters to keep) turned into the
fusion fields that reach it, by the plan measured best for cuts of that size.

A user who wants "10% fewer parameters" should not have to know which layers to cut. On SmolLM2
(BENCHMARKS.md, where-to-cut-smollm2; plans chosen on validation texts, confirmed on test texts, before any
healing) no one plan won at both sizes measured: at 10% fewer parameters a sensitivity budget over every
layer left perplexity lowest (1.55x the original's, against 1.78x for one ratio over every layer and 2.02x
for layers 20-29 at 0.5), while at 30% fewer the same budget fell apart (16.2x) and the block of the last
twenty layers at 0.25 was best (4.34x, against 5.83x for every layer at 0.5). So a size from BUDGET_FROM
up is a budget over every layer, and a smaller one a block of the last layers, as few as keep them at
BLOCK_RATIO or more. Sizes between and beyond the two measured are the rule's guess, not a measurement.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from torch import nn

from .checkpoint_files import meta_model, named_classes
from .config import parse_layers
from .errors import UserError
from .families import find_sites
from .records import count_parameters
from .site_fusion import select_sites
from .sites import MlpSite, weight_shape


def check_size(size: object) -> float:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size):
        raise UserError(f"size must be a number in (0, 1), got {size!r}")
    if not 0 < size < 1:
        raise UserError(f"size must be in (0, 1), the fraction of the model's parameters to keep; got {size}")
    return float(size)


BUDGET_FROM = 0.8  # halfway between the two sizes measured (0.90 and 0.70 of SmolLM2's parameters)
BLOCK_RATIO = 0.25


def fields_for_size(model: nn.Module, size: float, layers="all") -> dict:
    """The :class:`~mlp_fusion.FusionConfig` fields (``layers`` with a ``budget`` or a ``ratio``) that leave
    about ``size`` of ``model``'s parameters. Chosen ``layers`` get one ratio over them; without, the plan
    follows the size (see the module's note)."""
    size = check_size(size)
    sites = find_sites(model)
    if not sites:
        raise UserError(f"{type(model).__name__} has no MLP that mlp-fusion can narrow")
    if parse_layers(layers) != "all":
        return {"layers": layers, "ratio": mlp_share_for_size(model, size, sites, parse_layers(layers))}
    if size >= BUDGET_FROM or any(site.stack for site in sites):
        return {"layers": "all", "budget": mlp_share_for_size(model, size, sites, "all")}
    last = max(site.layer for site in sites)
    for first in range(last, 0, -1):  # the shortest block of last layers that keeps them at BLOCK_RATIO
        share = mlp_share_for_size(model, size, sites, list(range(first, last + 1)), refuse=False)
        if share >= BLOCK_RATIO - 1e-9:
            return {"layers": f"{first}-{last}", "ratio": share}
    return {"layers": f"0-{last}", "ratio": mlp_share_for_size(model, size, sites, list(range(last + 1)))}


def mlp_share_for_size(
    model: nn.Module, size: float, sites: list[MlpSite], layers, refuse: bool = True
) -> float:
    """The share of the parameters of the MLPs of ``layers`` to keep so that about ``size`` of ``model``'s
    parameters remain (widths are whole neurons); with ``refuse``, refused when they cannot give that up."""
    chosen = select_sites(sites, layers)
    if not chosen:
        raise UserError("no MLP to narrow in the chosen layers")
    total, mlps = count_parameters(model), sum(site_parameters(site) for site in chosen)
    share = 1 - (1 - size) * total / mlps
    smallest = max(1 / site.width for site in chosen)
    if share < smallest and refuse:
        most = 1 - mlps * (1 - smallest) / total
        raise UserError(
            f"size {size} needs more than the chosen MLPs hold ({mlps:,} of {total:,} parameters): "
            f"the smallest size they reach is about {most:.3f}; choose more layers or a larger size"
        )
    return share


def site_parameters(site: MlpSite) -> int:
    """The parameters of one MLP's weight matrices (all its experts)."""
    return sum(weight_shape(slot.module, slot.attr).numel() for slot in site.slots())


def skeleton(source: str) -> nn.Module:
    """The model ``source`` (a directory or hub id) names, built on the meta device: shapes, no weights."""
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of {source}: {str(error).splitlines()[0]}") from None
    build = next(iter(named_classes(config)), transformers.AutoModel.from_config)
    return meta_model(build, config, torch.float32, Path(source))

"""A whole-model size target (``size``: the fraction of the model's parameters to keep) turned into the
share of the chosen MLPs' parameters (every layer's unless told) that reaches it, and how that share is
spread (``SIZE_PLAN``).

A user who wants "10% fewer parameters" should not have to know which layers to cut. On SmolLM2, at the
parameter count of ten layers at half width, a sensitivity budget over every layer kept held-out perplexity
lowest, then one ratio over every layer, then the contiguous block: chosen on validation texts, confirmed
on test texts (BENCHMARKS.md, where-to-cut-smollm2). So a size is a budget over every layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from torch import nn

from .checkpoint_files import meta_model
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


SIZE_PLAN = "budget"  # the FusionConfig field a size becomes: "budget" (spread by sensitivity) or "ratio"


def mlp_share_for_size(model: nn.Module, size: float, layers="all") -> float:
    """The share of the MLPs of ``layers``' parameters to keep so that about ``size`` of ``model``'s
    parameters remain (widths are whole neurons); refused when those MLPs cannot give up that much."""
    size = check_size(size)
    sites = select_sites(find_sites(model), parse_layers(layers))
    if not sites:
        raise UserError("no MLP to narrow in the chosen layers")
    total, mlps = count_parameters(model), sum(site_parameters(site) for site in sites)
    share = 1 - (1 - size) * total / mlps
    smallest = max(1 / site.width for site in sites)
    if share < smallest:
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
    config = transformers.AutoConfig.from_pretrained(source)
    names = [name for name in getattr(config, "architectures", None) or [] if hasattr(transformers, name)]
    build = getattr(transformers, names[0]) if names else transformers.AutoModel.from_config
    return meta_model(build, config, torch.float32, Path(source))

"""Parameter sets a kernel is taken over, as lists of modules (each contributes all its own tensors)."""

from __future__ import annotations

from torch import nn

from ..config import names_site
from ..errors import UserError
from ..families import find_sites
from ..sites import ExpertModules, LinearMlp, MlpSite, StackedExperts


def site_modules(site: MlpSite) -> list[nn.Module]:
    """The modules that hold a site's tensors."""
    if isinstance(site, LinearMlp):
        return [*site.inputs, site.output]
    if isinstance(site, ExpertModules):
        return [module for member in site.members for module in site_modules(member)]
    if isinstance(site, StackedExperts):
        return [site.module]
    raise TypeError(f"unknown site type {type(site).__name__}")


def module_tensors(module: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors a module owns itself, the stored tensors of its parametrized weights included."""
    tensors = list(module.parameters(recurse=False))
    for chain in getattr(module, "parametrizations", {}).values():
        tensors += list(chain.parameters(recurse=False))
    return tensors


def kernel_modules(model: nn.Module, spec: str, fused_layers: list[int] | str) -> list[nn.Module]:
    """``mlp``: every MLP; ``fused``: the MLPs of ``fused_layers``; ``all``: the whole model; ``N``: layer N's MLPs."""
    if spec == "all":  # every module that owns tensors, so that memory can be bounded module by module
        return [
            module
            for name, module in model.named_modules()
            if "parametrizations" not in name.split(".") and module_tensors(module)
        ]
    sites = find_sites(model)
    if spec == "mlp":
        chosen = sites
    elif spec == "fused":
        chosen = [s for s in sites if names_site(fused_layers, s.stack, s.layer)]
    elif spec.isdigit():
        chosen = [s for s in sites if s.layer == int(spec)]
        if not chosen:
            raise UserError(
                f"layer {spec} has no MLP; this model's MLP layers are {sorted({s.layer for s in sites})}"
            )
    else:
        raise UserError(f"unknown parameter set {spec!r}: use mlp, fused, all, or a layer index")
    return [module for site in chosen for module in site_modules(site)]

"""Parametrizations that narrowed MLPs use, so that they work on Linear, Conv1D and stacked expert tensors alike.

The stored tensors are what the optimizer updates; the effective weight is computed from them on access.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.module import register_module_module_registration_hook
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from .errors import UserError


class NeuronScale(nn.Module):
    """Effective weight = stored weight x a fixed per-neuron scale along the neuron (input) axis.

    The scale is a buffer: saved in ``state_dict``, moved by ``.to()``, never a parameter. Keeping it out of
    the stored weight is what preserves the Adam training dynamics of the unfused model (METHOD.md, section 3).
    """

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Computed on every access: keeping the product between calls measured slower in greedy decoding
        # (benchmarks/inference.py). Linear and Conv1D layers scale their input instead when that is cheaper
        # (direct_forward); stacked expert tensors and code that reads ``.weight`` get this product.
        return weight * self.scale.to(weight.dtype)


class LowRank(nn.Module):
    """Effective weight = A @ B with A ``[..., m, r]`` and B ``[..., r, n]`` stored as two parameters."""

    def __init__(self, rank: int, decompose: bool = True):
        super().__init__()
        self.rank = rank
        self.decompose = decompose

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return left @ right

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated SVD, the singular values split evenly between the two factors (or, without
        ``decompose``, uninitialised factors of the right shapes)."""
        if not self.decompose:
            *batch, m, n = weight.shape
            return weight.new_empty(*batch, m, self.rank), weight.new_empty(*batch, self.rank, n)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[..., : self.rank].sqrt()
        left = u[..., : self.rank] * root.unsqueeze(-2)
        right = root.unsqueeze(-1) * vh[..., : self.rank, :]
        return left.to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous()


def direct_forward(module: nn.Module) -> None:
    """Make a Linear or Conv1D whose ``weight`` is parametrized compute from its stored tensors directly.

    - :class:`NeuronScale`: ``x (W s)^T = (x s) W^T``, the same function and stored-weight gradients; the
      input is scaled instead of the weight when a call has fewer tokens than output features (decoding),
      since each costs one multiply per entry.
    - :class:`LowRank`: ``x (A B)^T = (x B^T) A^T``, two thin products of ``r (m + n)`` multiply-adds per
      token instead of building the ``m x n`` weight on every call.
    Anything else keeps the module's own forward. The forward is set on the instance (a partial of a
    module-level function, which deep copies rebind to the copy), so the module keeps its class and
    ``weight`` still gives the full matrix to whoever reads it.
    """
    if not isinstance(module, (nn.Linear, Conv1D)) or not parametrize.is_parametrized(module, "weight"):
        return
    kind = type(module.parametrizations["weight"][0])
    forward = _FORWARDS.get((kind, isinstance(module, Conv1D)))
    if forward is not None:
        module.forward = functools.partial(forward, module)


def plain_forward(module: nn.Module) -> None:
    """Undo :func:`direct_forward` (before the parametrization is removed)."""
    module.__dict__.pop("forward", None)


def _linear_scaled(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    chain = self.parametrizations["weight"]  # weight [out, in] = stored * scale [1, in]
    if x.numel() // x.shape[-1] > chain.original.shape[0]:
        return F.linear(x, self.weight, self.bias)
    return F.linear(x * chain[0].scale.reshape(-1).to(x.dtype), chain.original, self.bias)


def _conv1d_scaled(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    chain = self.parametrizations["weight"]  # weight [in, out] = stored * scale [in, 1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > chain.original.shape[-1]:
        out = torch.addmm(self.bias, flat, self.weight)
    else:
        out = torch.addmm(self.bias, flat * chain[0].scale.reshape(-1).to(x.dtype), chain.original)
    return out.reshape(*x.shape[:-1], -1)


def _linear_factored(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    chain = self.parametrizations["weight"]  # weight [out, in] = A [out, r] @ B [r, in]
    return F.linear(F.linear(x, chain.original1), chain.original0, self.bias)


def _conv1d_factored(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    chain = self.parametrizations["weight"]  # weight [in, out] = A [in, r] @ B [r, out]
    flat = x.reshape(-1, x.shape[-1]) @ chain.original0 @ chain.original1
    return (flat + self.bias).reshape(*x.shape[:-1], -1)


_FORWARDS = {  # (parametrization, is Conv1D) -> forward
    (NeuronScale, False): _linear_scaled,
    (NeuronScale, True): _conv1d_scaled,
    (LowRank, False): _linear_factored,
    (LowRank, True): _conv1d_factored,
}


# The same fixed scale, applied to a layer's input instead of its weight. ``y = (W * s) x = W (s * x)``: the
# function and the gradients of W are the same, but the stored weight is then the layer's real ``weight``,
# so code that edits it in place (PEFT's LoRA merge) changes what the layer computes, and an adapter that
# reads the scaled input gets the fused parameterisation's dynamics too.
INPUT_SCALE = "neuron_scale"
_HOOK_ATTR = "_neuron_scale_hook"


def scales_to_inputs(model: nn.Module) -> list[nn.Module]:
    """Move every NeuronScale on a layer's ``weight`` (Linear, Conv1D, per-module experts) onto its input.

    Stacked expert tensors keep theirs: nothing reads their weight as a module's ``weight``. Returns the
    layers changed.
    """
    moved = []
    for module in list(model.modules()):
        scaling = _weight_scale(module)
        if scaling is None:
            continue
        plain_forward(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.register_buffer(INPUT_SCALE, scaling.scale)
        setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(scale_input))
        moved.append(module)
    return moved


def scales_to_weights(model: nn.Module) -> None:
    """Undo :func:`scales_to_inputs` (with whatever the stored weights have become since)."""
    for module in model.modules():
        if hasattr(module, _HOOK_ATTR):
            getattr(module, _HOOK_ATTR).remove()
            delattr(module, _HOOK_ATTR)
            scale = module._buffers.pop(INPUT_SCALE)
            parametrize_weight(module, "weight", NeuronScale(scale))


def has_input_scales(model: nn.Module) -> bool:
    return any(hasattr(module, _HOOK_ATTR) for module in model.modules())


def scale_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: multiply the first input by the module's ``neuron_scale`` (stored in the weight's
    layout, so flattened: the neuron axis is the input axis of Linear and Conv1D alike)."""
    x = args[0]
    return (x * getattr(module, INPUT_SCALE).reshape(-1).to(x.dtype), *args[1:])


def _weight_scale(module: nn.Module) -> NeuronScale | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = module.parametrizations["weight"]
    if len(chain) != 1 or not isinstance(chain[0], NeuronScale) or chain.original.dim() != 2:
        return None
    return chain[0]


def parametrize_weight(module: nn.Module, attr: str, parametrization: nn.Module) -> None:
    """Compute ``module.<attr>`` from stored tensors through ``parametrization``, with the direct forward
    where there is one; adapter libraries are refused the module from then on (:func:`_refuse_wrapping`)."""
    parametrize.register_parametrization(module, attr, parametrization)
    direct_forward(module)  # stacked experts: the experts' own forward reads the full weight
    if not _WRAPPING_REFUSED:
        _WRAPPING_REFUSED.append(register_module_module_registration_hook(_refuse_wrapping))


_WRAPPING_REFUSED: list = []  # the handle of the one registration hook, once a weight is computed


def _refuse_wrapping(parent: nn.Module, name: str, child: nn.Module) -> None:
    """torch's hook on every submodule registration: refuse ``child`` as the ``base_layer`` of an adapter
    wrapper (peft's name for the layer it wraps, set as the wrapper is built, before it replaces the layer).

    peft merges an adapter by adding its delta to ``base_layer.weight`` in place; where that weight is
    computed from stored tensors (a fixed scale, low-rank factors) the merge would be lost, so the wrapping
    must not happen. Putting a layer back (peft's unload) registers it under its own name, not this one.
    """
    kinds = {type(p) for chain in _chains(child) for p in chain} if name == "base_layer" else set()
    if LowRank in kinds:
        raise UserError(
            "an adapter cannot wrap a projection whose weight is computed from low-rank factors (an svd "
            "site): its merge could not land; leave that module out of the adapter's targets"
        )
    if NeuronScale in kinds:
        raise UserError(
            "peft cannot wrap a fused projection directly: its weight is the stored weight times fixed "
            "scales, and peft's merge would lose the adapter; use mlp_fusion.add_lora(model, config) to add "
            "adapters, mlp_fusion.load_lora(model, directory) to load saved ones (exact, merged by "
            "mlp_fusion.merge_lora)"
        )


def _chains(module: nn.Module) -> list:
    return list(module.parametrizations.values()) if parametrize.is_parametrized(module) else []

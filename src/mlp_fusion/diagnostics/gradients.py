"""Per-example gradients of a scalar output, as rows of a matrix.

Batched path: one forward and backward per micro-batch; hooks on each Linear / Conv1D module capture its
input and output gradient, and the per-example weight gradient is their product summed over tokens (padding
contributes zero). Gradients of parametrized weights (fused scale, low rank) are carried back to the stored
tensors with ``torch.func``. Modules of any other kind, or whose inputs are not one row per example (routed
experts), use the naive path: one example per backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from .parameters import module_tensors

ScalarFn = Callable[[nn.Module, dict], torch.Tensor]


class _NotPerExample(Exception):
    """A module's input does not have one row per example."""


def per_example_gradients(
    model: nn.Module, batches: list[dict], modules: list[nn.Module], scalar: ScalarFn, naive: bool = False
) -> list[torch.Tensor]:
    """Blocks ``[N, P_i]`` (float32) that side by side give row i = d f(x_i) / d(every tensor of ``modules``)."""
    if not naive and all(isinstance(m, (nn.Linear, Conv1D)) for m in modules):
        try:
            parts = [_hooked(model, batch, modules, scalar) for batch in batches]
            return [torch.cat(blocks) for blocks in zip(*parts)]
        except _NotPerExample:
            pass
    parts = [_one_at_a_time(model, batch, modules, scalar) for batch in batches]
    return [torch.cat(blocks) for blocks in zip(*parts)]


def _one_at_a_time(
    model: nn.Module, batch: dict, modules: list[nn.Module], scalar: ScalarFn
) -> list[torch.Tensor]:
    params = [p for m in modules for p in module_tensors(m)]
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = []
    for i, length in enumerate(lengths):
        single = {key: value[i : i + 1, :length] for key, value in batch.items()}
        grads = torch.autograd.grad(scalar(model, single).sum(), params, allow_unused=True)
        rows.append(
            [(torch.zeros_like(p) if g is None else g).flatten().float() for g, p in zip(grads, params)]
        )
    return [torch.stack(column) for column in zip(*rows)]


def _hooked(model: nn.Module, batch: dict, modules: list[nn.Module], scalar: ScalarFn) -> list[torch.Tensor]:
    inputs: dict[nn.Module, torch.Tensor] = {}
    output_grads: dict[nn.Module, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[module] = args[0]
        output.register_hook(lambda grad: output_grads.__setitem__(module, grad.detach()))

    handles = [m.register_forward_hook(capture) for m in modules]
    try:
        values = scalar(model, batch)
        # Asking for the modules' input gradients runs the backward through every module without also
        # computing the batch-summed weight gradients, which are not needed.
        targets = [x for x in inputs.values() if x.requires_grad] or [
            p for m in modules for p in module_tensors(m)
        ]
        torch.autograd.grad(values.sum(), targets, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    size = len(values)
    columns = []
    for module in modules:
        x, dy = inputs[module].detach(), output_grads.get(module)
        if dy is None or x.dim() != 3 or x.shape[0] != size:
            raise _NotPerExample
        if isinstance(module, Conv1D):
            weight_grad = torch.einsum("bti,bto->bio", x, dy)
        else:
            weight_grad = torch.einsum("bto,bti->boi", dy, x)
        columns += [g.flatten(1).float() for g in _stored_gradients(module, weight_grad)]
        if module.bias is not None:
            columns.append(dy.sum(1).float())
    return columns


def _stored_gradients(module: nn.Module, weight_grad: torch.Tensor) -> list[torch.Tensor]:
    """Per-example gradients of the tensors the optimizer sees, from those of the effective weight."""
    if not parametrize.is_parametrized(module, "weight"):
        return [weight_grad]
    chain = module.parametrizations.weight
    if hasattr(chain, "original"):
        originals = [chain.original.detach()]
    else:  # a parametrization that stores several tensors: original0, original1, ...
        originals = []
        while hasattr(chain, f"original{len(originals)}"):
            originals.append(getattr(chain, f"original{len(originals)}").detach())

    def effective(*stored: torch.Tensor) -> torch.Tensor:
        value = chain[0](*stored)
        for step in list(chain)[1:]:
            value = step(value)
        return value

    _, pull_back = torch.func.vjp(effective, *originals)
    return list(torch.func.vmap(pull_back)(weight_grad))

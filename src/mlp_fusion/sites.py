"""MLP sites: where a model keeps one MLP (or one layer's experts), read as sub-MLP tensors and written back.

A site reads its weights neuron-major (:class:`SubMlps`) and writes new ones of any width into the same
module classes, only narrower. Three layouts exist: one module per MLP with Linear or Conv1D projections
(:class:`LinearMlp`), a list of such modules, one per expert (:class:`ExpertModules`), and every expert of a
layer stacked in 3-D tensors (:class:`StackedExperts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .methods import SubMlps


@dataclass
class WeightSlot:
    """One stored weight of a site: ``getattr(module, attr)``, its neurons along ``neuron_axis``.

    ``expert`` is the site batch index the tensor belongs to, or None when it holds every expert.
    """

    module: nn.Module
    attr: str
    neuron_axis: int
    expert: int | None
    role: str  # "input" or "output"


def weight_shape(module: nn.Module, attr: str) -> torch.Size:
    """Shape of ``getattr(module, attr)`` without computing a parametrized weight."""
    chains = getattr(module, "parametrizations", None)
    if chains is None or attr not in chains:
        return getattr(module, attr).shape
    chain = chains[attr]
    if hasattr(chain, "original"):
        return chain.original.shape  # NeuronScale keeps the shape
    return chain.original0.shape[:-1] + chain.original1.shape[-1:]  # LowRank: A [..., m, r] @ B [..., r, n]


class MlpSite:
    """Base of the three layouts. ``name`` is a module path; ``layer`` the first index in it."""

    name: str
    layer: int
    experts: int | None = None  # number of experts, None for a dense MLP
    active_experts: int = 1  # experts evaluated per token
    config_key: str | None = None  # the config field that sets this MLP's width

    kind: str = "plain"  # "plain" or "gated"
    symmetry: str = "none"  # see SubMlps.symmetry

    @property
    def stack(self) -> str | None:
        """``"encoder"`` or ``"decoder"`` for a site in one stack of an encoder-decoder, else None."""
        parts = self.name.split(".")
        return next((p for p in ("encoder", "decoder") if p in parts), None)

    @property
    def width(self) -> int:
        slot = self.slots()[-1]
        return weight_shape(slot.module, slot.attr)[slot.neuron_axis]

    def read(self) -> SubMlps:
        raise NotImplementedError

    def write(self, sub: SubMlps) -> None:
        raise NotImplementedError

    def slots(self) -> list[WeightSlot]:
        raise NotImplementedError

    def mlp_flops_per_token(self) -> int:
        """Multiply-adds x 2 of the MLP's weight matrices for one token (the active experts only)."""
        total = sum(weight_shape(s.module, s.attr).numel() for s in self.slots())
        return 2 * self.active_experts * total // (self.experts or 1)

    def describe(self) -> str:
        experts = f", {self.experts} experts" if self.experts else ""
        return f"{self.name} (layer {self.layer}, {self.kind}{experts}, width {self.width})"


def _replace(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    # A clone, so that no two parameters ever share storage (views of one batched tensor would).
    fresh = value.detach().to(device=old.device, dtype=old.dtype).clone(memory_format=torch.contiguous_format)
    setattr(module, attr, nn.Parameter(fresh, old.requires_grad))


def _projection_axis(module: nn.Module, role: str) -> int:
    """Neuron axis of a Linear (``[out, in]``) or Conv1D (``[in, out]``) weight."""
    transposed = isinstance(module, Conv1D)
    return int(transposed) if role == "input" else int(not transposed)


def _read_projection(module: nn.Module, role: str) -> torch.Tensor:
    weight = module.weight.detach()
    rows = weight if _projection_axis(module, role) == 0 else weight.t()
    if role == "input" and module.bias is not None:
        rows = torch.cat([rows, module.bias.detach().unsqueeze(-1)], dim=-1)
    return rows


def _write_projection(module: nn.Module, role: str, rows: torch.Tensor) -> None:
    width = rows.shape[0]
    if role == "input" and module.bias is not None:
        rows, bias = rows[:, :-1], rows[:, -1]
        _replace(module, "bias", bias)
    _replace(module, "weight", rows if _projection_axis(module, role) == 0 else rows.t())
    if isinstance(module, Conv1D):
        if role == "input":
            module.nf = width
        else:
            module.nx = width
    elif role == "input":
        module.out_features = width
    else:
        module.in_features = width


class LinearMlp(MlpSite):
    """One MLP whose projections are Linear or Conv1D modules: ``inputs`` (one, or gate and up) and ``output``."""

    def __init__(
        self,
        name: str,
        layer: int,
        inputs: list[nn.Module],
        output: nn.Module,
        expert: int = 0,
        homogeneous: bool = False,
    ):
        self.name, self.layer = name, layer
        self.inputs, self.output, self.expert = inputs, output, expert
        self.kind = "gated" if len(inputs) == 2 else "plain"
        self.symmetry = "gated" if self.kind == "gated" else ("homogeneous" if homogeneous else "none")

    def read(self) -> SubMlps:
        return SubMlps(
            [_read_projection(m, "input").unsqueeze(0) for m in self.inputs],
            _read_projection(self.output, "output").unsqueeze(0),
            tuple(m.bias is not None for m in self.inputs),
            self.symmetry,
        )

    def write(self, sub: SubMlps) -> None:
        for module, rows in zip(self.inputs, sub.inputs):
            _write_projection(module, "input", rows[0])
        _write_projection(self.output, "output", sub.output[0])

    def slots(self) -> list[WeightSlot]:
        slots = [
            WeightSlot(m, "weight", _projection_axis(m, "input"), self.expert, "input") for m in self.inputs
        ]
        return slots + [
            WeightSlot(self.output, "weight", _projection_axis(self.output, "output"), self.expert, "output")
        ]


class ExpertModules(MlpSite):
    """A layer's experts as one module each (Switch Transformers), clustered together as one batch."""

    def __init__(self, name: str, layer: int, experts: list[LinearMlp], active_experts: int):
        self.name, self.layer, self.members = name, layer, experts
        self.experts, self.active_experts = len(experts), active_experts
        self.kind, self.symmetry = experts[0].kind, experts[0].symmetry

    def read(self) -> SubMlps:
        parts = [m.read() for m in self.members]
        return parts[0].with_tensors(
            [torch.cat(group) for group in zip(*(p.inputs for p in parts))],
            torch.cat([p.output for p in parts]),
        )

    def write(self, sub: SubMlps) -> None:
        for index, member in enumerate(self.members):
            member.write(sub.map_rows(lambda t, i=index: t[i : i + 1]))

    def slots(self) -> list[WeightSlot]:
        return [slot for member in self.members for slot in member.slots()]


class StackedExperts(MlpSite):
    """Experts stored as ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (transformers 5.x MoE)."""

    kind = "gated"
    symmetry = "gated"

    def __init__(self, name: str, layer: int, module: nn.Module, active_experts: int):
        self.name, self.layer, self.module = name, layer, module
        self.experts, self.active_experts = module.gate_up_proj.shape[0], active_experts

    def read(self) -> SubMlps:
        gate, up = self.module.gate_up_proj.detach().chunk(2, dim=1)
        output = self.module.down_proj.detach().transpose(1, 2)
        return SubMlps([gate, up], output, (False, False), self.symmetry)

    def write(self, sub: SubMlps) -> None:
        _replace(self.module, "gate_up_proj", torch.cat(sub.inputs, dim=1))
        _replace(self.module, "down_proj", sub.output.transpose(1, 2))
        if hasattr(self.module, "intermediate_dim"):
            self.module.intermediate_dim = sub.width

    def slots(self) -> list[WeightSlot]:
        return [
            WeightSlot(self.module, "gate_up_proj", 1, None, "input"),
            WeightSlot(self.module, "down_proj", 2, None, "output"),
        ]

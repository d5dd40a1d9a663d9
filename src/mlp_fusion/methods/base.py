"""What a method sees and returns: one layer's sub-MLPs as plain tensors, nothing about transformers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch


class MethodSettings(Protocol):
    """What a method reads of its settings (:class:`mlp_fusion.FusionConfig` has all of it): methods depend on
    this, not on the config, which sits above them."""

    seed: int
    n_init: int
    max_iter: int
    hartigan_rounds: int
    keep_fraction: float
    canonical: bool


@dataclass
class SubMlps:
    """The D sub-MLPs of one MLP, or of every expert of one layer, stacked on a leading batch axis.

    Neuron i is row i (axis 1) of every tensor. ``inputs`` holds one ``[B, D, d]`` tensor per input
    projection (one for a plain MLP, gate and up for a gated one), with that projection's bias appended as
    the last column when it has one (``has_bias``). ``output`` is the output projection transposed,
    ``[B, D, d_out]``; the output bias belongs to no sub-MLP and is not here.

    ``symmetry`` names the exact symmetries of one sub-MLP (METHOD.md, section 9): ``"gated"`` (sign and
    scale of up and down), ``"homogeneous"`` (a positive scale of the input row against the output, for
    ReLU-like activations) or ``"none"``. ``stream`` tells sites apart for methods that draw random numbers;
    ``first_expert`` says where a chunk of a layer's experts starts.
    """

    inputs: list[torch.Tensor]
    output: torch.Tensor
    has_bias: tuple[bool, ...]
    symmetry: str = "none"
    stream: int = 0
    first_expert: int = 0  # index of batch element 0 among the layer's experts (k-means seeds each one)

    @property
    def width(self) -> int:
        return self.output.shape[1]

    @property
    def batch(self) -> int:
        return self.output.shape[0]

    @property
    def row_length(self) -> int:
        """Numbers per sub-MLP vector (the last axis of :meth:`rows`)."""
        return sum(t.shape[-1] for t in self.inputs) + self.output.shape[-1]

    def rows(self) -> torch.Tensor:
        """The ``[B, D, p]`` matrix whose rows are the sub-MLP vectors ``[w_in_i, b_in_i, w_out_i]``."""
        return torch.cat([*self.inputs, self.output], dim=-1)

    def from_rows(self, rows: torch.Tensor) -> SubMlps:
        """Split ``[B, c, p]`` rows laid out as :meth:`rows` back into pieces."""
        sizes = [t.shape[-1] for t in self.inputs] + [self.output.shape[-1]]
        *inputs, output = torch.split(rows, sizes, dim=-1)
        return self.with_tensors(list(inputs), output)

    def with_tensors(self, inputs: list[torch.Tensor], output: torch.Tensor) -> SubMlps:
        """New tensors, the same layout, symmetry and stream."""
        return replace(self, inputs=inputs, output=output)

    def joined(self, other: SubMlps) -> SubMlps:
        """These neurons followed by ``other``'s, batch element by batch element."""
        inputs = [torch.cat(pair, dim=1) for pair in zip(self.inputs, other.inputs)]
        return self.with_tensors(inputs, torch.cat([self.output, other.output], dim=1))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SubMlps:
        return self.with_tensors([fn(t) for t in self.inputs], fn(self.output))

    def scale_inputs(self, weights: torch.Tensor) -> SubMlps:
        """Every input row multiplied coordinate by coordinate by ``weights`` ``[B, p_in]``: the sub-MLPs
        seen through a rescaled input basis (undone by the reciprocal weights)."""
        factor = weights.unsqueeze(1).to(self.output.device)
        return self.with_tensors([(t.double() * factor).to(t.dtype) for t in self.inputs], self.output)

    def zeros(self, width: int) -> SubMlps:
        """Zero tensors laid out like these, with ``width`` neurons."""
        return self.map_rows(lambda t: t.new_zeros(t.shape[0], width, t.shape[-1]))

    def neuron_scores(self) -> torch.Tensor:
        """``||w_in_i|| * ||w_out_i||`` (a product over every projection for gated MLPs), ``[B, D]``."""
        score = self.output.float().norm(dim=-1)
        for t in self.inputs:
            score = score * t.float().norm(dim=-1)
        return score


@dataclass
class MethodResult:
    """New sub-MLP tensors and how to write them: a fixed per-neuron scale ``[B, c]`` (fusion) or a rank (svd)."""

    sub: SubMlps
    scale: torch.Tensor | None = None
    rank: int | None = None
    inertia: torch.Tensor | None = None  # [B], clustering methods only


def join_results(parts: list[MethodResult]) -> MethodResult:
    """Results of one method on consecutive chunks of a layer's experts, as one result."""
    first = parts[0]
    inputs = [torch.cat(group) for group in zip(*(part.sub.inputs for part in parts))]
    sub = replace(
        first.sub.with_tensors(inputs, torch.cat([part.sub.output for part in parts])), first_expert=0
    )
    scale = None if first.scale is None else torch.cat([part.scale for part in parts])
    inertia = None if first.inertia is None else torch.cat([part.inertia for part in parts])
    return MethodResult(sub, scale, first.rank, inertia)


Method = Callable[[SubMlps, int, MethodSettings], MethodResult]


@dataclass(frozen=True)
class RegisteredMethod:
    """A method and what callers need to know about it; calling it calls the method."""

    fn: Method
    description: str
    clusters: bool = False  # runs k-means: keeps neurons, chunks a layer's experts to fit in memory
    exact_at_full_width: bool = True  # at ratio 1.0 the model computes what it did

    def __call__(self, sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
        return self.fn(sub, width, config)


METHODS: dict[str, RegisteredMethod] = {}
DESCRIPTIONS: dict[str, str] = {}  # the descriptions alone, as before METHODS held records


def register(
    name: str, description: str, *, clusters: bool = False, exact_at_full_width: bool = True
) -> Callable[[Method], Method]:
    """Add a method to the registry under ``name``, with its traits."""

    def add(fn: Method) -> Method:
        METHODS[name] = RegisteredMethod(fn, description, clusters, exact_at_full_width)
        DESCRIPTIONS[name] = description
        return fn

    return add

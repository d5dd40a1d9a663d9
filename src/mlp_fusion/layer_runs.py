"""Calibration one layer at a time, for fusing a checkpoint on disk without loading the whole model.

Only what lies outside the layer stack (embeddings, rotary tables, final norm, head) is read whole: it is
small. The model's own forward pass runs once per calibration micro-batch with every layer replaced by a
recorder, which keeps the arguments the model gives that layer (attention masks, rotary positions, sliding
windows, routing flags) and passes its input on. Then each layer, read from the checkpoint when its turn
comes, runs on the hidden states the layer before it produced, with its recorded arguments: the model's
layers run as the model runs them, and attention is never re-implemented. A layer whose MLPs are chosen is
fused on those runs (:func:`mlp_fusion.site_fusion.fuse_sites`, exactly as in memory), and its fused outputs are what the next
layer sees, as they are when the whole model is fused in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from .block_fit import fit_block
from .calibration import calibration_inputs, micro_batches
from .checkpoint_files import materialise_derived_buffers
from .config import FusionConfig
from .records import FusionReport, LayerReport, fusion_records, record_layers
from .site_fusion import budget_widths, checked_sites, fuse_sites, planned, sensitivity
from .sites import MlpSite

T = TypeVar("T")


class LayerStackError(Exception):
    """Why the chosen layers cannot be calibrated one at a time (the caller then fuses in memory)."""


class _Recorded(Exception):
    """Raised by the last recorder: the rest of the model is not needed."""


class _Recorder(nn.Module):
    """Stands in for layer ``index``: keeps its arguments and hands its input on unchanged."""

    def __init__(self, index: int, calls: dict, last: int):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        if self.index == self.last:
            raise _Recorded
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class _Part:
    """One micro-batch: which tokens are real, each layer's recorded arguments, the hidden states that
    reach the current layer, and (for block reconstruction, once a fused layer has changed them) the
    original model's hidden states there."""

    mask: torch.Tensor
    calls: dict[int, tuple[tuple, dict]]
    hidden: torch.Tensor | None = None
    original: torch.Tensor | None = None  # None: the same as ``hidden``

    def arguments(self, index: int, hidden: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """Layer ``index``'s recorded arguments, on ``hidden`` (by default the current hidden states)."""
        hidden = self.hidden if hidden is None else hidden
        args, kwargs = self.calls[index]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``index`` on ``hidden`` (by default the current hidden states): its output hidden states."""
        args, kwargs = self.arguments(index, hidden)
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class LayerRuns:
    """The calibration runs (:class:`mlp_fusion.calibration.Runs`) of one layer: the layer on the hidden
    states that reach it."""

    def __init__(self, model: nn.Module, layer: nn.Module, index: int, parts: list[_Part]):
        self.model, self.layer, self.index, self._parts = model, layer, index, parts

    def parts(self) -> Iterator[tuple[torch.Tensor, Callable[[], object]]]:
        for part in self._parts:
            args, kwargs = part.arguments(self.index)
            yield part.mask, lambda args=args, kwargs=kwargs: self.layer(*args, **kwargs)


def layer_stack(model: nn.Module, sites: list[MlpSite]) -> tuple[str, nn.ModuleList]:
    """The one list of layers that holds every chosen site, by name."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise LayerStackError("an encoder-decoder's decoder layers need the encoder's outputs")
    stacks = {_stack_of(model, site.name) for site in sites}
    if len(stacks) != 1 or None in stacks:
        raise LayerStackError("the chosen MLPs are not in one list of layers")
    name = stacks.pop()
    return name, model.get_submodule(name)


def layer_list_names(model: nn.Module, sites: list[MlpSite]) -> list[str]:
    """The lists of layers that hold ``sites``, by name, in model order."""
    names = [_stack_of(model, site.name) for site in sites]
    return [name for name in dict.fromkeys(names) if name is not None]


def stack_index(model: nn.Module, name: str) -> int:
    """The index, in its list of layers, of the layer that holds module ``name``."""
    stack = _stack_of(model, name)
    if stack is None:
        raise LayerStackError(f"{name} is not in a list of layers")
    return int(name[len(stack) + 1 :].split(".")[0])


def _stack_of(model: nn.Module, name: str) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end].isdigit() and isinstance(model.get_submodule(".".join(parts[:end])), nn.ModuleList):
            return ".".join(parts[:end])
    return None


class LayerWalk:
    """Walks the layer stack of a meta-device ``model`` in order, reading each layer with ``read`` (name,
    device, dtype -> tensor), fusing its chosen sites on the calibration runs and carrying its outputs on.
    With ``read`` None the model is already in memory: nothing is read or released, and each layer runs
    once per micro-batch instead of the whole model once per site.

    ``groups`` maps a layer index to its chosen sites; layers after the last of them are never run.
    """

    def __init__(
        self,
        model: nn.Module,
        read: Callable[[str, torch.device, torch.dtype], torch.Tensor] | None,
        groups: dict[int, list[MlpSite]],
        batch: dict,
        device: torch.device,
    ):
        self.model, self.read, self.groups, self.device = model, read, groups, device
        self.stack_name, self.stack = layer_stack(model, [s for group in groups.values() for s in group])
        self.last = max(groups)
        self.current: int | None = None
        self._next_originals: list[torch.Tensor] | None = None  # a block fit's targets, for the carry
        self._fill([n for n, _ in model.named_modules() if not _under(n, self.stack_name)])
        self.parts = self._record(batch)
        self._drop(model)  # the embeddings' work is done (no layer has been read yet)

    def layer_of(self, name: str) -> int | None:
        """The stack index of the tensor ``name`` when it lies in a layer this walk runs, else None."""
        if not _under(name, self.stack_name) or name == self.stack_name:
            return None
        index = int(name[len(self.stack_name) + 1 :].split(".")[0])
        return index if index <= self.last else None

    def enter(
        self, index: int, config: FusionConfig, progress, widths: dict[str, int] | None = None
    ) -> list[LayerReport]:
        """Read layer ``index`` (releasing the one before), fuse its chosen sites (at ``widths`` when a
        budget was spread already), and run it on to the next."""

        def fuse_layer(runs: LayerRuns, sites: list[MlpSite]) -> list[LayerReport]:
            reference = f"{sites[0].stack}:{sites[0].layer}" if sites[0].stack else sites[0].layer
            targets = self._original_outputs(index) if config.block_steps else None
            done = fuse_sites(self.model, replace(config, layers=[reference]), progress, runs, widths).layers
            if targets is not None:
                self._fit_block(index, sites, targets, config, progress)
            return done

        return self.visit(index, fuse_layer) or []

    def visit(self, index: int, work: Callable[[LayerRuns, list[MlpSite]], T]) -> T | None:
        """Read layer ``index`` (releasing the one before), call ``work`` with its calibration runs and its
        chosen sites when it has some, and run the layer, as ``work`` left it, on to the next."""
        self.release()
        self.current = index
        prefix = f"{self.stack_name}.{index}"
        self._fill([n for n, _ in self.model.named_modules() if _under(n, prefix)])
        layer = self.stack[index]
        done = None
        if index in self.groups:
            done = work(LayerRuns(self.model, layer, index, self.parts), self.groups[index])
        if index < self.last:
            self._carry(layer, index)
        return done

    def release(self) -> None:
        if self.current is not None:
            self._drop(self.stack[self.current])

    def _fill(self, names: list[str]) -> None:
        """Read the named modules' tensors from the checkpoint (nothing to do for a model in memory)."""
        if self.read is not None:
            _materialize(self.model, names, self.read, self.device)

    def _drop(self, module: nn.Module) -> None:
        """Release ``module``'s tensors once read from the checkpoint (a model in memory keeps them)."""
        if self.read is not None:
            module.to("meta")

    @torch.no_grad()
    def _original_outputs(self, index: int) -> list[torch.Tensor]:
        """The original model's output of layer ``index`` (not fused yet) for every micro-batch."""
        layer = self.stack[index]
        return [part.run(layer, index, part.original) for part in self.parts]

    def _fit_block(self, index: int, sites: list[MlpSite], targets: list[torch.Tensor], config, progress):
        """Block reconstruction of the fused layer ``index`` toward ``targets``; they become the original
        hidden states the walk carries on."""
        layer = self.stack[index]
        runs = [
            (part.mask, lambda part=part: part.run(layer, index), target)
            for part, target in zip(self.parts, targets)
        ]
        weights = list(dict.fromkeys(p for s in sites for p in self.model.get_submodule(s.name).parameters()))
        before, after = fit_block(runs, weights, config.block_steps, config.seed + index)
        if progress is not None:
            progress(f"block fit of layer {index}: output error {before:.4f} -> {after:.4f}")
        self._next_originals = targets

    @torch.no_grad()
    def _carry(self, layer: nn.Module, index: int) -> None:
        """Run ``layer`` on every micro-batch, and the original model's hidden states on beside when a
        block fit made them differ."""
        given = self._next_originals or [None] * len(self.parts)
        for part, original in zip(self.parts, given):
            if original is None and part.original is not None:  # an unfused layer: the original's own
                original = part.run(layer, index, part.original)
            part.original = original
            part.hidden = part.run(layer, index)
            del part.calls[index]
        self._next_originals = None

    @torch.no_grad()
    def _record(self, batch: dict) -> list[_Part]:
        model, stack = self.model, self.stack
        layers = list(stack)
        parts = []
        try:
            for piece in micro_batches(batch, self.device):
                calls: dict = {}
                for index in range(self.last + 1):
                    stack[index] = _Recorder(index, calls, self.last)
                try:
                    model(**calibration_inputs(model, piece))
                except _Recorded:
                    pass
                first_args, first_kwargs = calls[0]
                hidden = first_args[0] if first_args else first_kwargs["hidden_states"]
                parts.append(_Part(piece["attention_mask"].bool(), calls, hidden))
        finally:
            for index, layer in enumerate(layers):
                stack[index] = layer
        return parts


def fuse_walking(
    model: nn.Module,
    config: FusionConfig,
    batch: dict,
    progress: Callable[[str], None] | None,
    sites: list[MlpSite],
) -> FusionReport | None:
    """Calibrated :func:`fuse` of a model in memory, one layer at a time: each layer runs once per
    micro-batch on the hidden states the layer before it (fused when chosen) produced, so the cost grows
    with the layers, not with layers times sites as when the model runs from its start for every site.
    The same tensors either way. A budget is spread first, on one walk over the unfused layers. ``sites``:
    every site of the model. Every check is made before any change. None, with nothing changed, when the
    chosen sites are not in one list of layers (the caller then runs the whole model for each site). The
    model runs in eval mode and is given back in its own."""
    was_training = model.training
    model.eval()
    try:
        checked = checked_sites(model, sites, config)
        chosen = [site for site, _ in checked]
        widths = None
        if config.budget is not None:  # measured on a first walk over the unfused layers
            widths = spread_budget(_walk_in_memory(model, chosen, batch), chosen, config)
        planned(model, checked, config, None, widths)  # the widths' checks, before any change
        walk = _walk_in_memory(model, chosen, batch)
        start, done = time.perf_counter(), len(fusion_records(model))
        report = FusionReport.begin(model, sites, config.method)
        for index in range(walk.last + 1):
            report.layers += walk.enter(index, config, progress, widths)
        record_layers(model, config.layers, since=done)
        return report.finish(model, sites, start)
    except LayerStackError:
        return None
    finally:
        model.train(was_training)


def _walk_in_memory(model: nn.Module, chosen: list[MlpSite], batch: dict) -> LayerWalk:
    groups: dict[int, list[MlpSite]] = {}
    for site in chosen:
        groups.setdefault(stack_index(model, site.name), []).append(site)
    return LayerWalk(model, None, groups, batch, next(model.parameters()).device)


def spread_budget(walk: LayerWalk, chosen: list[MlpSite], config: FusionConfig) -> dict[str, int]:
    """Each chosen site's width under ``config.budget``, from its sensitivity on ``walk``'s runs of the
    unfused layers: one pass over the layers, where the whole model would run once per site. The walk is
    used up (a checkpoint's last layer released)."""
    curves = {}

    def measure(runs: LayerRuns, sites: list[MlpSite]) -> None:
        for site in sites:
            curves[site.name] = sensitivity(walk.model, site, config, runs)

    for index in range(walk.last + 1):
        walk.visit(index, measure)
    walk.release()
    return budget_widths(chosen, curves, config)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _materialize(
    model: nn.Module,
    names: list[str],
    read: Callable[[str, torch.device, torch.dtype], torch.Tensor],
    device: torch.device,
) -> None:
    """Give the named modules real tensors: parameters and saved buffers read from the checkpoint (a tied
    parameter once, under whichever name the file has), buffers the checkpoint does not hold (rotary
    tables, embedding scales) computed by the model's own initialisation, as when it is loaded whole."""
    modules = [model.get_submodule(name) for name in names]
    materialise_derived_buffers(model, device, modules)
    done: dict[int, nn.Parameter] = {}
    for name, module in zip(names, modules):
        prefix = f"{name}." if name else ""
        for key, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) not in done:
                tensor = read(prefix + key, device, parameter.dtype)
                done[id(parameter)] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
            if parameter is not None:
                module._parameters[key] = done[id(parameter)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and key not in module._non_persistent_buffers_set:
                module._buffers[key] = read(prefix + key, device, buffer.dtype)

"""Calibration-aware fusion: what a few real inputs show about one MLP site, and the output refit they allow.

Sites are calibrated one at a time, in model order, on the model as it is at that moment (earlier sites
already fused), as sequential one-shot pruners do; each forward pass stops right after the site, so only
that site's inputs and outputs are ever held. What a forward pass is comes from a :class:`Runs`: the whole
model on a tokenised batch (:class:`ModelRuns`), or one layer on the hidden states that reach it when a
checkpoint is fused layer by layer (:mod:`mlp_fusion.layer_runs`). Two uses, neither of which the methods
need to know about:
- input weighting: each input coordinate is scaled by its root-mean-square activation before the method
  runs and unscaled afterwards, so k-means (and prune's scores) measure distances where inputs really are;
- output refit: the fused output projection (and output bias) is refitted by ridge least squares against
  the original MLP's outputs, with the cluster-size scale held fixed, so the paper's parameterisation stays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .batches import model_inputs, padded_batch
from .errors import UserError
from .methods import SubMlps
from .sites import ExpertModules, LinearMlp, MlpSite, StackedExperts, WeightSlot

MICRO_BATCH = 8


@dataclass
class SiteCalibration:
    """One site's calibration tokens, one entry per batch element (expert): inputs ``[n_e, d]`` and the
    original MLP's outputs ``[n_e, d_out]``, float32, padding excluded where the layout shows it."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]

    def input_weights(self, sub: SubMlps) -> torch.Tensor:
        """``[B, p_in]`` weights of the input columns of ``sub``: per-coordinate RMS activation (1 for a
        bias column), all divided by the mean RMS so that weighted rows keep their usual magnitude. An
        expert that no calibration token reached gets equal weights."""
        features = sub.inputs[0].shape[-1] - int(sub.has_bias[0])
        rows = []
        for x in self.inputs:
            if len(x):
                rms = x.double().pow(2).mean(0).sqrt()
                rms = rms.clamp_min(1e-3 * float(rms.max().clamp_min(1e-12)))
            else:
                rms = torch.ones(features, dtype=torch.float64)
            rows.append(torch.cat([rms, rms.new_ones(1)]) / rms.mean())
        weights = torch.stack(rows)
        return weights if sub.has_bias[0] else weights[:, :-1]


class _SiteDone(Exception):
    """Raised by a hook once the site has run: the rest of the forward pass is not needed."""


class Runs(Protocol):
    """The calibration forward passes, one per micro-batch: its attention mask ``[b, T]`` (which tokens are
    real) and a call that runs it (at least as far as the site being calibrated). ``model`` is the model
    the sites belong to."""

    model: nn.Module

    def parts(self) -> Iterator[tuple[torch.Tensor, Callable[[], object]]]: ...


class ModelRuns:
    """The whole model on a tokenised batch (``input_ids`` and ``attention_mask``, right-padded), in
    micro-batches of :data:`MICRO_BATCH`, in eval mode."""

    def __init__(self, model: nn.Module, batch: dict):
        self.model, self.batch = model, batch

    def parts(self) -> Iterator[tuple[torch.Tensor, Callable[[], object]]]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for part in micro_batches(self.batch, device):
                yield (
                    part["attention_mask"].bool(),
                    lambda part=part: model(**calibration_inputs(model, part)),
                )
        finally:
            model.train(was_training)


def micro_batches(batch: dict, device: torch.device) -> Iterator[dict]:
    """``batch`` in slices of :data:`MICRO_BATCH` rows on ``device``: the same slices wherever the
    calibration runs, so layer-by-layer and in-memory fusion compute the same numbers."""
    for start in range(0, len(batch["input_ids"]), MICRO_BATCH):
        yield {k: v[start : start + MICRO_BATCH].to(device) for k, v in batch.items()}


def calibration_inputs(model: nn.Module, part: dict) -> dict:
    """``part`` as keyword arguments for ``model``, without a key-value cache: calibration runs a layer more
    than once on the same inputs, and keeping keys and values would only cost memory."""
    inputs = model_inputs(model, part)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def calibrate_site(runs: Runs, site: MlpSite) -> SiteCalibration:
    """The site's inputs and original outputs on the calibration runs (the model run up to the site)."""
    return calibrate_hidden(runs, site)[0]


@torch.no_grad()
def calibrate_hidden(runs: Runs, site: MlpSite) -> tuple[SiteCalibration, list[torch.Tensor]]:
    """As :func:`calibrate_site`, plus the hidden activations ``[n_e, D]`` (the output projection's input)."""
    inputs, hidden = _run_to_site(runs, site)
    targets = [_output_of(site, index, h) for index, h in enumerate(hidden)]
    return SiteCalibration(inputs, targets), hidden


@torch.no_grad()
def refit_output(runs: Runs, site: MlpSite, calibration: SiteCalibration, ridge: float) -> float:
    """Refit the site's output projection and bias by ridge least squares against the original outputs.

    Minimises ``||Y - H' diag(n) W^T - b||^2 + lam ||W - W_0||^2`` for the stored weight ``W`` (the scale
    ``n`` held fixed), with ``lam = ridge x`` the mean activation energy: the mean diagonal entry of the
    Gram matrix of ``H' diag(n)`` (centred when there is a bias), i.e. the squared activation of one hidden
    coordinate summed over the calibration tokens, averaged over coordinates. Returns the relative error
    on the calibration tokens after the refit.
    """
    _, hidden = _run_to_site(runs, site)
    errors, energy = 0.0, 0.0
    for index, (h, y) in enumerate(zip(hidden, calibration.targets)):
        if not len(h):
            continue  # an expert no calibration token reached keeps its weights
        slot = _output_slot(site, index)
        stored, bias = _stored_rows(slot, index), _bias(slot)
        scaled = h.double() * _scale(slot, index)
        weight, offset = _ridge(scaled, y.double(), stored.double(), ridge, bias is not None)
        _write_rows(slot, index, weight)
        if bias is not None:
            bias.copy_(offset.to(device=bias.device, dtype=bias.dtype))
        fitted = scaled @ weight + (offset if bias is not None else 0)
        errors += float((fitted - y.double()).pow(2).sum())
        energy += float(y.double().pow(2).sum())
    return (errors / max(energy, 1e-300)) ** 0.5


RECONSTRUCT_BATCH = 1024  # calibration tokens per Adam step of the reconstruction
RECONSTRUCT_LR = 1e-3  # Adam's step size, relative to the RMS of each stored weight


def reconstruct(
    model: nn.Module, site: MlpSite, calibration: SiteCalibration, steps: int, seed: int
) -> float | None:
    """Fit the fused MLP's stored weights (input projections, output projection and biases; the scale held
    fixed, as a buffer) to the original MLP's outputs on the calibration tokens, by ``steps`` Adam steps on
    random batches of tokens. Only a dense site whose module maps its input to the MLP's output (a LLaMA
    or GPT-2 MLP) is fitted; others are left as they are. Returns the relative error after the fit, or
    None when the site was not fitted."""
    module = model.get_submodule(site.name)
    x, y = calibration.inputs[0], calibration.targets[0]
    if not isinstance(site, LinearMlp) or not len(x) or not _maps_input_to_output(module, site, x[:2]):
        return None
    weights = list(module.parameters())
    device, dtype = weights[0].device, weights[0].dtype
    rates = [RECONSTRUCT_LR * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8)) for p in weights]
    optimiser = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(weights, rates)])
    generator = torch.Generator().manual_seed(seed)
    scale = float(y.pow(2).mean())
    was_training = module.training
    module.train(False)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(len(x), (min(RECONSTRUCT_BATCH, len(x)),), generator=generator)
            fitted = module(x[rows].to(device=device, dtype=dtype)).float()
            loss = (fitted - y[rows].to(device)).pow(2).mean() / scale
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    module.train(was_training)
    for p in weights:
        p.grad = None
    with torch.no_grad():
        fitted = torch.cat(
            [module(part.to(device=device, dtype=dtype)).float().cpu() for part in x.split(4096)]
        )
    return float((fitted - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)) ** 0.5


def _maps_input_to_output(module: nn.Module, site: MlpSite, x: torch.Tensor) -> bool:
    """Whether calling ``module`` on the site's input gives exactly what its output projection returns."""
    seen = []
    handle = site.output.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            out = module(x.to(device=site.output.weight.device, dtype=site.output.weight.dtype))
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        handle.remove()
    return len(seen) == 1 and isinstance(out, torch.Tensor) and torch.equal(out, seen[0])


def _ridge(h: torch.Tensor, y: torch.Tensor, start: torch.Tensor, ridge: float, with_bias: bool):
    """Solve for ``W`` ``[c, d_out]`` (and ``b``) in ``y ~ h W + b``, pulled toward ``start`` by the ridge."""
    h_mean = h.mean(0) if with_bias else h.new_zeros(h.shape[1])
    y_mean = y.mean(0) if with_bias else y.new_zeros(y.shape[1])
    hc, yc = h - h_mean, y - y_mean
    gram = hc.T @ hc
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram + lam * eye, hc.T @ yc + lam * start)
    return weight, y_mean - h_mean @ weight


def _run_to_site(runs: Runs, site: MlpSite) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and hidden activations (the output projection's input) of every batch element of the site."""
    experts = site.experts or 1
    inputs: list[list[torch.Tensor]] = [[] for _ in range(experts)]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(experts)]
    mask: list[torch.Tensor] = []
    handles = _hooks(runs.model, site, inputs, hidden, mask)
    try:
        with torch.no_grad():
            for keep, run in runs.parts():
                mask[:] = [keep]
                try:
                    run()
                except _SiteDone:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return [_joined(x) for x in inputs], [_joined(h) for h in hidden]


def _hooks(model, site, inputs, hidden, mask) -> list:
    def tokens(x: torch.Tensor) -> torch.Tensor:
        keep = mask[0]
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
            return x[keep]
        if x.dim() == 2 and x.shape[0] == keep.numel():
            return x[keep.flatten()]
        return x.reshape(-1, x.shape[-1])  # routed expert tokens: padding cannot be told apart here

    if isinstance(site, StackedExperts):
        return _stacked_hooks(site, inputs, hidden, tokens)
    members = site.members if isinstance(site, ExpertModules) else [site]
    handles = []
    for index, member in enumerate(members):

        def take_input(module, args, index=index):
            inputs[index].append(tokens(args[0]).float().cpu())

        def take_hidden(module, args, output, index=index):
            hidden[index].append(tokens(args[0]).float().cpu())
            if not isinstance(site, ExpertModules):
                raise _SiteDone

        handles.append(member.inputs[0].register_forward_pre_hook(take_input))
        handles.append(member.output.register_forward_hook(take_hidden))
    if isinstance(site, ExpertModules):
        parent = model.get_submodule(site.name.rsplit(".", 1)[0])
        handles.append(parent.register_forward_hook(lambda *_: _raise_done()))
    return handles


def _stacked_hooks(site: StackedExperts, inputs, hidden, tokens) -> list:
    module = site.module

    def take(mod, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        keep = tokens(torch.arange(states.shape[0], device=states.device).unsqueeze(-1)).squeeze(-1)
        states, index = states[keep], index[keep]
        for expert in range(site.experts):
            x = states[(index == expert).any(-1)]
            inputs[expert].append(x.float().cpu())
            hidden[expert].append(_stacked_hidden(module, expert, x).float().cpu())
        raise _SiteDone

    return [module.register_forward_pre_hook(take, with_kwargs=True)]


def _stacked_hidden(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _raise_done() -> None:
    raise _SiteDone


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _output_slot(site: MlpSite, index: int) -> WeightSlot:
    slots = [slot for slot in site.slots() if slot.role == "output"]
    return slots[index] if len(slots) > 1 else slots[0]


def _stored(slot: WeightSlot) -> torch.Tensor:
    """The tensor the optimiser updates: the parametrization's original when there is one."""
    chains = getattr(slot.module, "parametrizations", None)
    if chains is not None and slot.attr in chains:
        return chains[slot.attr].original
    return getattr(slot.module, slot.attr)


def _stored_rows(slot: WeightSlot, index: int) -> torch.Tensor:
    """The stored output weight of batch element ``index`` as ``[width, d_out]``."""
    tensor = _stored(slot)
    if slot.expert is None and tensor.dim() == 3:
        tensor = tensor[index]
        return tensor.T if slot.neuron_axis == 2 else tensor
    return tensor if slot.neuron_axis == 0 else tensor.T


def _write_rows(slot: WeightSlot, index: int, rows: torch.Tensor) -> None:
    target = _stored_rows(slot, index)
    target.copy_(rows.to(device=target.device, dtype=target.dtype))


def _scale(slot: WeightSlot, index: int) -> torch.Tensor:
    """The fixed per-neuron scale of the output projection (``[width]``, float64), ones when there is none."""
    chains = getattr(slot.module, "parametrizations", None)
    width = _stored_rows(slot, index).shape[0]
    if chains is None or slot.attr not in chains:
        return torch.ones(width, dtype=torch.float64)
    scale = chains[slot.attr][0].scale
    if slot.expert is None and scale.dim() == 3:
        scale = scale[index]
    return scale.reshape(-1).double().cpu()


def _bias(slot: WeightSlot) -> torch.Tensor | None:
    return getattr(slot.module, "bias", None) if slot.attr == "weight" else None


def _output_of(site: MlpSite, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The original MLP's output for ``hidden`` activations: hidden @ W_out (+ bias)."""
    slot = _output_slot(site, index)
    weight = _stored_rows(slot, index).detach().double().cpu() * _scale(slot, index).unsqueeze(-1)
    if not len(hidden):  # an expert no calibration token reached
        return torch.zeros(0, weight.shape[1])
    out = hidden.double() @ weight
    bias = _bias(slot)
    if bias is not None:
        out = out + bias.detach().double().cpu()
    return out.float()


def calibration_batch(
    tokenizer, texts: list[str], pairs: list[str] | None = None, max_length: int = 128
) -> dict:
    """Calibration inputs as :func:`fuse` takes them: tokenised with special tokens, right-padded."""
    return padded_batch(tokenizer, texts, pairs, max_length)


def first_calibration_batch(
    tokenizer, texts: list[str] | None, pairs: list[str] | None, count: int, max_length: int
) -> dict | None:
    """The first ``count`` of ``texts`` (and ``pairs``) as :func:`calibration_batch` makes them; None
    without texts, refused without a tokenizer."""
    if texts is None:
        return None
    if tokenizer is None:
        raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
    return calibration_batch(tokenizer, texts[:count], pairs[:count] if pairs else None, max_length)

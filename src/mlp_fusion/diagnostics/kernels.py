"""Empirical neural tangent kernels on probe inputs: ``adam`` = G sign(G)^T, ``sgd`` = G G^T.

G holds one row of per-example gradients of a scalar output f(x) per probe, over a chosen parameter set.
The Gram matrices are accumulated group of modules by group of modules, so memory is bounded by
``max_memory_mb`` rather than by the parameter count, and summed in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batches import micro_batches, model_inputs
from .gradients import per_example_gradients
from .parameters import module_tensors

KERNELS = ("adam", "sgd")
COLUMN_CHUNK = 1 << 20  # columns per float32 matrix product before adding into the float64 sums


def scalar_outputs(model: nn.Module, batch: dict, seed: int = 0) -> torch.Tensor:
    """One number per example, the f(x) the kernels differentiate.

    Classification heads: the logit of class 0. Language-model logits: log p(last token | the tokens before
    it). Hidden states (an encoder without a head): ``<h_first, u>`` with a fixed random unit vector u.
    """
    out = model(**model_inputs(model, batch))[0]
    if out.dim() == 2:
        return out[:, 0]
    mask = batch["attention_mask"]
    rows = torch.arange(out.shape[0], device=out.device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if out.shape[-1] == getattr(config, "vocab_size", None):
        last = (mask.sum(1) - 1).to(out.device)
        log_probs = out[rows, (last - 1).clamp_min(0)].float().log_softmax(-1)
        return log_probs[rows, batch["input_ids"].to(out.device)[rows, last]]
    generator = torch.Generator().manual_seed(seed)
    readout = torch.randn(out.shape[-1], generator=generator)
    readout = (readout / readout.norm()).to(device=out.device, dtype=out.dtype)
    return out[:, 0] @ readout


def empirical_kernels(
    model: nn.Module,
    batch: dict,
    modules: list[nn.Module],
    kernels: tuple[str, ...] = KERNELS,
    *,
    batch_size: int = 16,
    max_memory_mb: float = 1024,
    naive: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The N x N kernels (float64) of ``model`` over the tensors of ``modules``, N = probes in ``batch``.

    Probes run in micro-batches of ``batch_size``, longest first so that little padding is computed; the
    kernels come back in the order of ``batch``.
    """
    count = len(batch["input_ids"])
    order = batch["attention_mask"].sum(1).argsort(descending=True, stable=True)
    batches = micro_batches({key: value[order] for key, value in batch.items()}, batch_size)
    sums = {name: torch.zeros(count, count, dtype=torch.float64) for name in kernels}

    def scalar(m: nn.Module, b: dict) -> torch.Tensor:
        return scalar_outputs(m, b, seed)

    for group in _groups(modules, max_memory_mb * 2**20 / (4 * count)):
        for block in per_example_gradients(model, batches, group, scalar, naive):
            for start in range(0, block.shape[1], COLUMN_CHUNK):
                chunk = block[:, start : start + COLUMN_CHUNK]
                if "adam" in sums:
                    sums["adam"] += (chunk @ chunk.sign().T).double().cpu()
                if "sgd" in sums:
                    sums["sgd"] += (chunk @ chunk.T).double().cpu()
    restore = order.argsort()
    return {name: value[restore][:, restore] for name, value in sums.items()}


def kernel_error(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error ``||K' - K|| / ||K||`` and alignment ``<K, K'> / (||K|| ||K'||)``."""
    norm = reference.norm()
    error = float((other - reference).norm() / norm)
    alignment = float((reference * other).sum() / (norm * other.norm()))
    return error, alignment


def _groups(modules: list[nn.Module], max_columns: float) -> list[list[nn.Module]]:
    """Consecutive modules whose gradient rows fit ``max_columns`` (at least one module per group)."""
    groups: list[list[nn.Module]] = []
    size = 0
    for module in modules:
        count = sum(p.numel() for p in module_tensors(module))
        if groups and size + count <= max_columns:
            groups[-1].append(module)
            size += count
        else:
            groups.append([module])
            size = count
    return groups

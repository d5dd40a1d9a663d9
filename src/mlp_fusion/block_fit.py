"""Block reconstruction: fit a fused layer's MLPs so that the whole layer gives the original model's output.

The output refit (and ``reconstruct_steps``) match each fused MLP to the original MLP on the inputs the
MLP now sees, one matrix or one MLP at a time. Errors then add up from layer to layer. Here the target is
the original model's output of the whole layer (attention, norms and MLP: the nonlinear region), while
the layer runs on the hidden states the already fused layers before it produce; only the fused MLPs'
stored weights train (their fixed scales are buffers), so each layer also makes up for what the layers
before it lost. The layer walk (:mod:`mlp_fusion.layer_runs`) carries the original model's hidden states
beside the fused ones to give these targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BLOCK_LR = 1e-2  # Adam's step size relative to each stored weight's RMS: the best of 1e-3 and 1e-2 on SmolLM2

# One calibration micro-batch: which tokens are real ``[b, T]``, a call running the layer on it (with
# autograd when enabled) and the original model's output of the layer ``[b, T, d]``.
BlockRun = tuple[torch.Tensor, Callable[[], torch.Tensor], torch.Tensor]


def fit_block(
    runs: list[BlockRun], weights: list[nn.Parameter], steps: int, seed: int
) -> tuple[float, float]:
    """``steps`` Adam steps on ``weights``, each on one micro-batch drawn at random (seeded), minimising
    the squared error of the layer's output against the original's over real tokens. Returns the relative
    error over all runs before and after."""
    before = block_error(runs)
    rates = [BLOCK_LR * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8)) for p in weights]
    optimiser = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(weights, rates)])
    generator = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in weights]
    for p in weights:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                mask, run, target = runs[int(torch.randint(len(runs), (1,), generator=generator))]
                errors, energy = _squared_errors(mask, run(), target)
                optimiser.zero_grad(set_to_none=True)
                (errors / energy.clamp_min(1e-30)).backward()
                optimiser.step()
    finally:
        for p, flag in zip(weights, flags):
            p.requires_grad_(flag)
            p.grad = None
    return before, block_error(runs)


@torch.no_grad()
def block_error(runs: list[BlockRun]) -> float:
    """The relative error of the layer's output against the original's, over the real tokens of all runs."""
    errors, energy = 0.0, 0.0
    for mask, run, target in runs:
        e, t = _squared_errors(mask, run(), target)
        errors, energy = errors + float(e), energy + float(t)
    return (errors / max(energy, 1e-30)) ** 0.5


def _squared_errors(mask: torch.Tensor, out, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = out[0] if isinstance(out, tuple) else out
    keep = mask.to(out.device)
    difference = (out[keep].float() - target[keep].float()).pow(2).sum()
    return difference, target[keep].float().pow(2).sum()

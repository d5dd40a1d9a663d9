"""The paper's ``mmd`` baseline: c learned vectors whose distribution matches the D sub-MLPs'.

The centroids minimise the squared maximum mean discrepancy to the sub-MLP vectors under a Gaussian kernel
(bandwidth: the median squared distance between sub-MLPs), by Adam from a random subset of the sub-MLPs.
Matching a distribution gives every learned vector the same weight, so each stands for ``D / c`` sub-MLPs:
that is its fixed scale, kept apart from the weights as fusion keeps the cluster sizes.
"""

from __future__ import annotations

import torch

from .base import MethodResult, MethodSettings, SubMlps, register

STEPS = 200
BANDWIDTH_SAMPLE = 512


def kernel_mean(a: torch.Tensor, b: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean Gaussian kernel ``exp(-||a_i - b_j||^2 / bandwidth)`` over all row pairs."""
    return torch.exp(-torch.cdist(a, b).pow(2) / bandwidth).mean(dim=(1, 2))


def squared_mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared MMD between the rows of ``x`` ``[B, n, p]`` and ``y`` ``[B, m, p]``."""
    return kernel_mean(x, x, bandwidth) + kernel_mean(y, y, bandwidth) - 2 * kernel_mean(x, y, bandwidth)


def median_bandwidth(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[B, 1, 1]`` median squared distance between distinct rows of (a sample of) ``x``."""
    sample = x[:, torch.randperm(x.shape[1], generator=generator)[:BANDWIDTH_SAMPLE].to(x.device)]
    distances = torch.cdist(sample, sample).pow(2)
    off_diagonal = ~torch.eye(sample.shape[1], dtype=torch.bool, device=x.device)
    if not off_diagonal.any():
        return torch.ones(x.shape[0], 1, 1, device=x.device)
    return distances[:, off_diagonal].median(dim=-1).values.clamp_min(1e-12).view(-1, 1, 1)


@register("mmd", "learned vectors matching the sub-MLP distribution by MMD, each with the fixed scale D/c")
def mmd(sub: SubMlps, width: int, config: MethodSettings) -> MethodResult:
    rows = sub.rows().float()
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + sub.stream)
    bandwidth = median_bandwidth(rows, generator)
    start = torch.randperm(sub.width, generator=generator)[:width].sort().values.to(rows.device)
    centers = rows[:, start].clone()
    if width < sub.width:
        centers = _descend(rows, centers, bandwidth)
    scale = torch.full((sub.batch, width), sub.width / width, device=rows.device)
    return MethodResult(sub.from_rows(centers.to(sub.output.dtype)), scale=scale)


def _descend(rows: torch.Tensor, centers: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    centers = centers.requires_grad_()
    optimizer = torch.optim.Adam([centers], lr=0.1 * float(rows.std()))
    with torch.enable_grad():
        for _ in range(STEPS):
            optimizer.zero_grad()
            # squared MMD without its constant term k(rows, rows)
            loss = kernel_mean(centers, centers, bandwidth) - 2 * kernel_mean(rows, centers, bandwidth)
            loss.sum().backward()
            optimizer.step()
    return centers.detach()

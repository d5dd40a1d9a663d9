"""Parametrizations that narrowed MLPs use, so that they work on Linear, Conv1D and stacked expert tensors alike.

The stored tensors are what the optimizer updates; the effective weight is computed from them on access.
"""

from __future__ import annotations

import torch
from torch import nn


class NeuronScale(nn.Module):
    """Effective weight = stored weight x a fixed per-neuron scale along the neuron (input) axis.

    The scale is a buffer: saved in ``state_dict``, moved by ``.to()``, never a parameter. Keeping it out of
    the stored weight is what preserves the Adam training dynamics of the unfused model (METHOD.md, section 3).
    """

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale.to(weight.dtype)


class LowRank(nn.Module):
    """Effective weight = A @ B with A ``[..., m, r]`` and B ``[..., r, n]`` stored as two parameters."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return left @ right

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated SVD, the singular values split evenly between the two factors."""
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[..., : self.rank].sqrt()
        left = u[..., : self.rank] * root.unsqueeze(-2)
        right = root.unsqueeze(-1) * vh[..., : self.rank, :]
        return left.to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous()

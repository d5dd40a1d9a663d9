"""The precision of training's matrix products: bfloat16 autocast (the weights, their gradients and the
optimizer state stay float32) or plain float32. Healing and fine-tuning take the same two names."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

PRECISIONS = ("bfloat16", "float32")


def check_precision(precision: str, option: str) -> None:
    """Refuse an unknown precision, naming the option it came from."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown {option} {precision!r}: choose one of {', '.join(PRECISIONS)}")


def check_device_precision(precision: str, device: torch.device, option: str) -> None:
    """Refuse bfloat16 on a GPU that has no bfloat16 arithmetic (before any work, not as a traceback)."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if precision == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU has no bfloat16 arithmetic: use {option} float32")


def autocast(model: nn.Module, precision: str):
    """Autocast to bfloat16 on the model's device, or nothing (float32)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")

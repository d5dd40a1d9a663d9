"""LoRA (through the optional ``peft`` library) on fused and unfused models, merged exactly.

A fused output projection computes ``(W * s) h`` with the cluster sizes ``s`` fixed. PEFT would add its
delta to that computed weight, which is not stored anywhere, and its adapter would read ``h`` without ``s``.
:func:`add_lora` first moves each such scale onto the layer's input (same function, same gradients) and
lets the adapter read the scaled input too, so the delta has the fused parameterisation
(``W s + B A s``) and PEFT's own ``merge_and_unload`` adds ``B A`` to the stored weight: merged and
unmerged models agree. :func:`merge_lora` merges and puts the scales back into the fused format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from ..errors import UserError, first_line
from ..fuse import fusion_records
from ..parametrizations import INPUT_SCALE, scale_input, scales_to_inputs, scales_to_weights


@dataclass
class LoraSettings:
    """The LoRA adapter that ``finetune --peft lora`` trains (the base weights stay frozen)."""

    lora_rank: int = field(default=8, metadata={"help": "rank of each adapter"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale numerator: deltas are alpha/rank x B A"})
    lora_targets: str = field(
        default="all-linear",
        metadata={
            "help": "comma-separated module names to adapt, or 'all-linear' (every linear layer but the head)"
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise UserError(f"--lora-rank must be at least 1, not {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be positive, not {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if not [name for name in self.lora_targets.split(",") if name.strip()]:
            raise UserError("--lora-targets names no module")

    def peft_config(self, task_type: str | None):
        peft = require_peft()
        targets = self.lora_targets
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        return peft.LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            task_type=task_type,
        )


def add_lora(model: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model(model, config)`` with the fixed scales of a fused model kept exact.

    ``config`` is a ``peft.LoraConfig``. The adapters of scaled projections read the scaled input. Refuses
    targets whose weight is computed from factors (``svd`` sites): a merge could not land in them.
    """
    peft = require_peft()
    if getattr(config, "use_dora", False) and fusion_records(model):
        raise UserError(
            "DoRA cannot be merged exactly into a fused model (its weight norm would see the fixed scales); "
            "use plain LoRA (use_dora=False)"
        )
    scales_to_inputs(model)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:
        scales_to_weights(model)
        raise UserError(f"cannot add LoRA: {first_line(error)}") from None
    for name, layer in _lora_layers(wrapped):
        base = layer.get_base_layer()
        if parametrize.is_parametrized(base):
            raise UserError(
                f"LoRA cannot adapt {name}: its weight is computed from low-rank factors (an svd site); "
                "leave it out of the targets"
            )
        if hasattr(base, INPUT_SCALE):
            for adapter in layer.lora_A.values():
                adapter.register_buffer(INPUT_SCALE, getattr(base, INPUT_SCALE), persistent=False)
                adapter.register_forward_pre_hook(scale_input)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper with its adapters merged, scales back in the fused format."""
    merged = model.merge_and_unload()
    scales_to_weights(merged)
    return merged


def _lora_layers(model: nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            yield name, module


def require_peft():
    """The peft library; refused with one line (before anything is written) when it is missing."""
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs the peft library: pip install peft") from None
    return peft

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
from pathlib import Path

from torch import nn

from ..errors import UserError, first_line
from ..parametrizations import INPUT_SCALE, scale_input, scales_to_inputs, scales_to_weights
from ..records import fusion_records


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
    _refuse_dora(model, config)
    return _wrapped(model, lambda: peft.get_peft_model(model, config), "cannot add LoRA")


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """``peft.PeftModel.from_pretrained(model, directory)`` for an adapter that :func:`add_lora` trained and
    peft saved: the same exact wrapping, so the loaded model and its merge compute what was trained."""
    peft = require_peft()
    try:
        config = peft.PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the adapter in {directory}: {first_line(error)}") from None
    _refuse_dora(model, config)
    load = lambda: peft.PeftModel.from_pretrained(model, str(directory))  # noqa: E731
    return _wrapped(model, load, f"cannot load the adapter in {directory}")


def _refuse_dora(model: nn.Module, config) -> None:
    if getattr(config, "use_dora", False) and fusion_records(model):
        raise UserError(
            "DoRA cannot be merged exactly into a fused model (its weight norm would see the fixed scales); "
            "use plain LoRA (use_dora=False)"
        )


def _wrapped(model: nn.Module, wrap, failure: str) -> nn.Module:
    """``wrap()`` (peft wrapping ``model``) with every fixed scale moved onto its layer's input first, and
    each adapter of a scaled layer reading that scaled input; the scales go back if peft refuses."""
    scales_to_inputs(model)
    try:
        wrapped = wrap()
    except UserError:  # a target whose weight is computed from factors (parametrizations.py)
        scales_to_weights(model)
        raise
    except (ValueError, OSError) as error:
        scales_to_weights(model)
        raise UserError(f"{failure}: {first_line(error)}") from None
    for _, layer in _lora_layers(wrapped):
        base = layer.get_base_layer()
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

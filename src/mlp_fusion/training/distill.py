"""Layer-wise task-specific tuning (METHOD.md section 6): pull a fused model's hidden states back to the original's.

Both models run in eval mode (no dropout: the fused model learns the original's deterministic function);
the original is frozen. The loss is the mean over layers of the per-token squared distance
between hidden states, padding excluded; only the fused MLPs' stored tensors are updated (the fixed scale
is a buffer and stays as it is), with Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..adapters import find_sites
from ..diagnostics.parameters import module_tensors, site_modules
from ..errors import UserError
from ..fuse import fusion_records
from ..probes import model_inputs


def fused_tensors(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of the MLPs that :func:`mlp_fusion.fuse` changed."""
    fused = {record.name for record in fusion_records(model)}
    return [
        p
        for site in find_sites(model)
        if site.name in fused
        for m in site_modules(site)
        for p in module_tensors(m)
    ]


def hidden_state_loss(original_states: tuple, fused_states: tuple, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean over real tokens of ``||h' - h||^2``."""
    keep = mask.bool()
    losses = [((b - a) ** 2).sum(-1)[keep].mean() for a, b in zip(original_states[1:], fused_states[1:])]
    return torch.stack(losses).mean()


def hidden_state_error(original: nn.Module, fused: nn.Module, batches: Iterable[dict]) -> float:
    """The distillation loss averaged over ``batches``, without training."""
    values = []
    with torch.no_grad():
        for batch in batches:
            values.append(
                float(
                    hidden_state_loss(
                        _states(original, batch), _states(fused, batch), batch["attention_mask"]
                    )
                )
            )
    return sum(values) / len(values)


def distill(
    original: nn.Module,
    fused: nn.Module,
    batches: list[dict],
    *,
    epochs: int = 1,
    lr: float = 5e-5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Tune ``fused``'s fused MLPs so its hidden states match ``original``'s on ``batches``; returns the errors."""
    trainable = fused_tensors(fused)
    if not trainable:
        raise UserError("the model has no fused MLP to tune; fuse it first")
    if epochs < 1 or lr <= 0:
        raise UserError("distillation needs at least one epoch and a positive learning rate")
    original.eval()
    before = hidden_state_error(original, fused, batches)
    chosen = {id(p) for p in trainable}
    frozen = [p for p in fused.parameters() if id(p) not in chosen and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = fused.training
    optimizer = torch.optim.Adam(trainable, lr=lr)
    fused.eval()
    try:
        for epoch in range(epochs):
            for step, batch in enumerate(batches, 1):
                with torch.no_grad():
                    target = _states(original, batch)
                loss = hidden_state_loss(target, _states(fused, batch), batch["attention_mask"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if progress is not None:
                    progress(
                        f"distill epoch {epoch + 1}/{epochs} step {step}/{len(batches)} loss {loss.item():.4f}"
                    )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        fused.train(was_training)
    return {"before": before, "after": hidden_state_error(original, fused, batches)}


def _states(model: nn.Module, batch: dict) -> tuple:
    out = model(**model_inputs(model, batch), output_hidden_states=True)
    if getattr(out, "hidden_states", None) is not None:
        return out.hidden_states
    return out.encoder_hidden_states  # encoder-decoder: the encoder's states share the input's mask

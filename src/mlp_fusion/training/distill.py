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

from ..batches import model_inputs
from ..diagnostics.parameters import module_tensors, site_modules
from ..errors import UserError
from ..families import find_sites
from ..records import fusion_records


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


def next_token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` per position, averaged over ``mask``.

    The ``T^2`` factor keeps the gradient's size independent of the temperature (Hinton et al., 2015), so
    one weight serves every temperature. Positions where ``mask`` is 0 (padding) do not count.
    """
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    keep = mask.bool()
    return per_position[keep].mean() * temperature**2


class Teacher:
    """The frozen unfused model whose next-token distribution a fused model is pulled toward while it trains.

    ``loss(model, inputs)`` returns ``(1 - weight) * task loss + weight * next_token_kl`` over every real
    token of the batch (the prompt's too: it is text the original model knows). The teacher runs in eval
    mode without gradients; it is never saved with the student.
    """

    def __init__(self, model: nn.Module, weight: float, temperature: float = 1.0):
        if not 0 < weight <= 1:
            raise UserError(f"the distillation weight must be in (0, 1], not {weight}")
        if not temperature > 0:
            raise UserError(f"the distillation temperature must be above 0, not {temperature}")
        self.model = model.eval().requires_grad_(False)
        self.weight = weight
        self.temperature = temperature

    def loss(self, student: nn.Module, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, object]:
        outputs = student(**inputs)
        with torch.no_grad():
            target = self.model(**inputs).logits
        kl = next_token_kl(outputs.logits, target, _output_mask(student, inputs), self.temperature)
        return (1 - self.weight) * outputs.loss + self.weight * kl, outputs


def _output_mask(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Which output positions are real tokens: the decoder's for an encoder-decoder, else the input's."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return inputs["attention_mask"]
    if "decoder_attention_mask" in inputs:
        return inputs["decoder_attention_mask"]
    return inputs["labels"] != -100

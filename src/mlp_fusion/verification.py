"""The comparison ``compress --verify`` and the diagnostics make: the outputs of two models on one batch."""

from __future__ import annotations

import torch
from torch import nn

from .batches import model_inputs


@torch.no_grad()
def main_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits, or the last hidden state for a model without a head. Encoder-decoders decode their input."""
    device = next(model.parameters()).device
    return model(**model_inputs(model, {k: v.to(device) for k, v in batch.items()}))[0].float()


def compare(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """Max absolute difference and relative error ``||b - a|| / ||a||`` over non-padding positions.

    Outputs with one row per sequence (a classification head) are compared whole.
    """
    a, b = reference, other
    if tuple(reference.shape[:2]) == tuple(mask.shape):
        keep = mask.bool().to(reference.device)
        a, b = reference[keep], other[keep]
    elif reference.dim() == 2 and reference.shape[0] == mask.numel():  # tokens flattened (MoE experts)
        keep = mask.flatten().bool().to(reference.device)
        a, b = reference[keep], other[keep]
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "relative_error": float((a - b).norm() / a.norm().clamp_min(1e-12)),
    }


def agreement(model: nn.Module, reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """:func:`compare`'s numbers and one a user judges the model's job by: for a language model's logits,
    how often the two agree on the next token; for hidden states (an encoder: embeddings), the cosine
    similarity of the two sentence embeddings (mean over the real tokens), mean and lowest over the batch."""
    numbers = compare(reference, other, mask)
    if reference.dim() != 3 or tuple(reference.shape[:2]) != tuple(mask.shape):
        return numbers
    keep = mask.bool().to(reference.device)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None and reference.shape[-1] == head.weight.shape[0]:
        same = reference.argmax(-1) == other.argmax(-1)
        return {**numbers, "next_token_agreement": float(same[keep].float().mean())}
    weights = keep.unsqueeze(-1).float()
    pooled = [(x * weights).sum(1) / weights.sum(1) for x in (reference, other)]
    cosine = torch.nn.functional.cosine_similarity(*pooled, dim=-1)
    return {
        **numbers,
        "embedding_cosine_mean": float(cosine.mean()),
        "embedding_cosine_min": float(cosine.min()),
    }

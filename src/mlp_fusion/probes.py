"""Probe inputs and the comparisons ``compress --verify`` makes: outputs of two models on the same batch."""

from __future__ import annotations

import torch
from torch import nn

# Sentences written for this project: varied length, topic and tone.
PROBE_SENTENCES = [
    "The committee postponed its decision until the budget figures arrive next week.",
    "A quiet film that lingers long after the credits roll.",
    "Honestly, the battery died before lunch and the charger was nowhere to be found.",
    "Rain is expected in the northern valleys, with clearer skies by Sunday evening.",
    "She solved the puzzle in minutes, then spent an hour explaining it to everyone else.",
    "The new bridge cut the commute in half for thousands of people on the east side.",
    "I would not recommend the soup, but the bread was excellent.",
    "Prices for fresh vegetables rose sharply after the late frost damaged early crops.",
    "His latest novel is clumsy, overlong and strangely moving.",
    "Measure twice, cut once.",
    "The museum reopened with a collection of maps drawn by sailors in the sixteenth century.",
    "Our team shipped the update on Friday and spent the weekend fixing what it broke.",
    "The orchestra played with precision, yet the evening never quite caught fire.",
    "A small error in the first step can grow into a large one by the last.",
    "Tickets sold out within an hour, which surprised even the organisers.",
    "The trail climbs steadily through pine forest before opening onto a wide ridge.",
]


def probe_batch(model: nn.Module, tokenizer, count: int = 8, max_length: int = 64) -> dict:
    """Tokenised probe sentences, or fixed random token ids when there is no tokenizer."""
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        texts = PROBE_SENTENCES[:count]
        return dict(
            tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        )
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (count, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def main_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits, or the last hidden state for a model without a head. Encoder-decoders decode their input."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if getattr(model.config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = batch["input_ids"]
    return model(**batch)[0].float()


def compare(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """Max absolute difference and relative error ``||b - a|| / ||a||`` over non-padding positions.

    Outputs with one row per sequence (a classification head) are compared whole.
    """
    a, b = reference, other
    if tuple(reference.shape[:2]) == tuple(mask.shape):
        keep = mask.bool().to(reference.device)
        a, b = reference[keep], other[keep]
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "relative_error": float((a - b).norm() / a.norm().clamp_min(1e-12)),
    }

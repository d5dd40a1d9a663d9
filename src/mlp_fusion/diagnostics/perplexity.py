"""Perplexity of a causal language model on texts, each scored on its own."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..batches import pad_right, position_limit
from ..errors import UserError
from ..recipes import is_causal_lm_class


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` predicts next tokens: a causal LM class (not a masked LM) with an output embedding."""
    return (
        is_causal_lm_class(type(model).__name__)
        and hasattr(model, "get_output_embeddings")
        and model.get_output_embeddings() is not None
    )


@torch.no_grad()
def text_losses(
    model: nn.Module, tokenizer, texts: list[str], max_length: int = 512, batch_size: int = 8
) -> tuple[list[tuple[float, int]], int]:
    """Each text's total negative log-likelihood (nats) and predicted-token count, in the order given; and
    ``max_length`` (lowered to the model's position limit where that is shorter).

    Each text is tokenised on its own with the tokenizer's default special tokens and cut to ``max_length``
    tokens; every token after the first is predicted from those before it. A text of fewer than two tokens
    predicts nothing: ``(0.0, 0)``. Kept per text so that comparisons can resample texts (paired intervals).
    """
    if not has_lm_head(model):
        raise UserError(f"{type(model).__name__} is not a causal language model: perplexity needs one")
    limit = position_limit(model)
    max_length = min(max_length, limit) if limit is not None else max_length
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    # batches of similar lengths waste less on padding
    order = sorted((i for i, ids in enumerate(encoded) if len(ids) > 1), key=lambda i: len(encoded[i]))
    losses = [(0.0, 0)] * len(texts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_right([encoded[i] for i in chunk])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        targets, keep = ids[:, 1:], mask[:, 1:].bool()
        log_probs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll = -(log_probs * keep).sum(1)
        for row, index in enumerate(chunk):
            losses[index] = (float(nll[row]), int(keep[row].sum()))
    return losses, max_length


def perplexity(
    model: nn.Module, tokenizer, texts: list[str], max_length: int = 512, batch_size: int = 8
) -> dict:
    """``exp(total negative log-likelihood / predicted tokens)`` over ``texts`` (scored as
    :func:`text_losses` says). Returns ``perplexity``, ``tokens`` (predicted tokens), ``nll`` (their total,
    in nats), ``texts`` (those with a token to predict) and ``max_length``.
    """
    losses, max_length = text_losses(model, tokenizer, texts, max_length, batch_size)
    scored = [(nll, count) for nll, count in losses if count]
    if not scored:
        raise UserError("no text has two or more tokens: nothing to predict")
    total, tokens = sum(nll for nll, _ in scored), sum(count for _, count in scored)
    return {
        "perplexity": math.exp(total / tokens),
        "tokens": tokens,
        "nll": total,
        "texts": len(scored),
        "max_length": max_length,
    }

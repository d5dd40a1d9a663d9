"""Drawing texts from a causal language model: nucleus (top-p) sampling, its own short decoding loop.

transformers' ``generate`` sorts the whole vocabulary for every row at every step to find the nucleus and
then draws with ``torch.multinomial`` over the whole vocabulary: on a 2-core CPU that was a third of
SmolLM2's sampling time and most of Gemma-3's (262k words). Here the nucleus is found among a row's likeliest
words when they already hold the top-p mass, and the draw is an inverse-CDF lookup in the nucleus. The
model's own generation settings play no part.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

CANDIDATES = (1024, 16384)  # how many of the likeliest words are looked at for the nucleus, in turn


def nucleus_choice(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """One token id per row of ``logits`` ``[rows, vocabulary]``, drawn from the smallest set of most likely
    words whose probability reaches ``top_p`` (the first word always in it), renormalised.

    Each row's nucleus is looked for among its top 1,024 words, then its top 16,384, and only then in its
    whole sorted vocabulary: a partial selection costs a fraction of a sort, and finds the same set.
    """
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    vocabulary = probabilities.shape[-1]
    picked = torch.empty(len(probabilities), dtype=torch.long, device=probabilities.device)
    pending = torch.arange(len(probabilities), device=probabilities.device)
    for width in (*[w for w in CANDIDATES if w < vocabulary], vocabulary):
        rows = probabilities[pending]
        if width < vocabulary:
            top, words = rows.topk(width, dim=-1)
            enough = top.sum(-1) >= top_p
        else:
            top, words = rows.sort(dim=-1, descending=True)
            enough = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        picked[pending[enough]] = words[enough].gather(-1, _draw(top[enough], top_p)).squeeze(-1)
        pending = pending[~enough]
        if not len(pending):
            break
    return picked


def _draw(ranked: torch.Tensor, top_p: float) -> torch.Tensor:
    """Positions drawn from rows of probabilities in descending order, each row cut to its nucleus (the
    words whose mass before them is below ``top_p``): the inverse of each row's cumulative nucleus mass at a
    uniform draw, which costs far less than ``torch.multinomial`` over a whole vocabulary."""
    cumulative = ranked.cumsum(-1)
    kept = torch.where(cumulative - ranked < top_p, ranked, torch.zeros_like(ranked))
    kept[:, 0] = ranked[:, 0]
    mass = kept.cumsum(-1)
    point = torch.rand(len(ranked), 1, device=ranked.device) * mass[:, -1:]
    return torch.searchsorted(mass, point).clamp_max(ranked.shape[-1] - 1)


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    start: int,
    end: int | None,
    rows: int,
    new_tokens: int,
    top_p: float,
    temperature: float,
) -> list[list[int]]:
    """``rows`` token sequences sampled from ``start``, each up to ``new_tokens`` long, cut before its first
    ``end`` (the draw uses torch's global generator: seed it first)."""
    device = next(model.parameters()).device
    tokens = torch.full((rows, 1), start, dtype=torch.long, device=device)
    drawn, done, cache = [], torch.zeros(rows, dtype=torch.bool, device=device), None
    # the cache's keyword: ``cache`` in recent transformers 5 releases, ``past_key_values`` before
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for step in range(new_tokens):
        mask = torch.ones(rows, step + 1, dtype=torch.long, device=device)
        out = model(input_ids=tokens, attention_mask=mask, use_cache=True, **{keyword: cache})
        cache = out[keyword]
        tokens = nucleus_choice(out.logits[:, -1], top_p, temperature).unsqueeze(-1)
        drawn.append(tokens)
        if end is not None:
            done |= tokens.squeeze(-1) == end
            if bool(done.all()):
                break
    sequences = torch.cat(drawn, dim=-1).tolist() if drawn else [[] for _ in range(rows)]
    return [row[: row.index(end)] if end is not None and end in row else row for row in sequences]

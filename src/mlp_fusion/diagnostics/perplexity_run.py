"""``perplexity(model, texts, ...)``: what a compression costs a causal language model before any
fine-tuning, measured on a text file or a list of texts: the library verb behind ``mlp-fusion perplexity``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError, check_given
from ..loading import LoadSettings
from .perplexity import has_lm_head
from .perplexity import perplexity as perplexity_of


def perplexity(
    model: str | Path,
    texts: str | Path | list[str],
    *,
    max_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    load: LoadSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The perplexity of ``model`` (a bundled alias, directory, fused directory or hub id) on ``texts``: a file
    (one text a line, or a TSV/CSV/JSONL text column) or a list of texts, the first ``max_samples`` of them,
    each cut to ``max_length`` tokens. Returns ``model``, ``data`` (the file; None for a list),
    ``perplexity``, ``tokens``, ``nll``, ``texts`` and ``max_length`` (lowered to the model's position
    limit where that is shorter). Every argument is checked before the model is loaded."""
    from ..batches import read_probe_texts
    from ..loading import load_model

    say = progress or (lambda message: None)
    for name, value in (("max_samples", max_samples), ("max_length", max_length), ("batch_size", batch_size)):
        if (value is not None or name != "max_samples") and (not isinstance(value, int) or value < 1):
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_given((load, LoadSettings, "load"))
    data = Path(texts) if isinstance(texts, (str, Path)) else None
    texts = read_probe_texts(data, max_samples, what="text file") if data else _given(texts, max_samples)
    say(f"loading {model}")
    loaded = load_model(str(model), load)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer files; perplexity needs the model's tokenizer")
    if not has_lm_head(loaded.model):
        raise UserError(f"{loaded.source} is not a causal language model: perplexity needs one")
    say(f"scoring {len(texts)} texts")
    result = perplexity_of(loaded.model, loaded.tokenizer, texts, max_length, batch_size)
    if result["max_length"] < max_length:
        say(f"texts cut to {result['max_length']} tokens, the model's position limit")
    return {"model": loaded.source, "data": None if data is None else str(data), **result}


def _given(texts, count: int | None) -> list[str]:
    """A list of texts as given: strings, at least one."""
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise UserError("texts must be a file or a non-empty list of strings")
    return list(texts[:count] if count else texts)

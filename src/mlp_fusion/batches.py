"""Model inputs: texts read from a file (or the built-in probe sentences), tokenised into padded batches
and micro-batches, and passed to any model as keyword arguments."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .textfiles import read_text, table_rows

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


TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "premise")


def read_probe_texts(path: str | Path, count: int | None = None, what: str = "probe file") -> list[str]:
    """Inputs from a text file (one per line), a TSV/CSV with a header, or JSONL; the text column is the
    first of :data:`TEXT_COLUMNS` present (else the first column). ``what`` names the file in messages."""
    path = Path(path)
    raw = read_text(path, what)
    if path.suffix.lower() in (".jsonl", ".tsv", ".csv"):
        texts = [_text_of(row) for _, row in table_rows(raw, path)]
    else:
        texts = [line.strip() for line in raw.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise UserError(f"{what} {path} holds no inputs")
    return texts[:count] if count else texts


def _text_of(row: dict) -> str:
    """The row's first text column (by :data:`TEXT_COLUMNS`, case aside), else its first column."""
    names = {str(name).strip().lower(): name for name in row}
    column = next((names[c] for c in TEXT_COLUMNS if c in names), next(iter(row), None))
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def probe_batch(
    model: nn.Module, tokenizer, count: int = 8, max_length: int = 64, texts: list[str] | None = None
) -> dict:
    """Tokenised probe sentences (the built-in ones unless ``texts``), right-padded; random ids without a tokenizer."""
    texts = (PROBE_SENTENCES if texts is None else texts)[:count]
    if tokenizer is not None:
        return padded_batch(tokenizer, texts, max_length=max_length)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (count, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def padded_batch(tokenizer, texts: list[str], pairs: list[str] | None = None, max_length: int = 64) -> dict:
    """``texts`` (and second segments) tokenised with the tokenizer's special tokens and right-padded by hand:
    the user's tokenizer may have no padding token, and stays untouched."""
    rows = [
        tokenizer(text, pairs[i] if pairs else None, truncation=True, max_length=max_length)["input_ids"]
        for i, text in enumerate(texts)
    ]
    return pad_right(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def pad_right(rows: list[list[int]], pad: int = 0) -> dict:
    """Token id lists as ``input_ids`` and ``attention_mask`` tensors, right-padded to the longest."""
    longest = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([row + [pad] * (longest - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows]),
    }


def micro_batches(batch: dict, size: int) -> list[dict]:
    """``batch`` cut into batches of ``size``, each trimmed to its longest example (right padding)."""
    parts = []
    for start in range(0, len(batch["input_ids"]), size):
        part = {key: value[start : start + size] for key, value in batch.items()}
        longest = int(part["attention_mask"].sum(1).max())
        parts.append({key: value[:, :longest] for key, value in part.items()})
    return parts


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """``batch`` as keyword arguments for ``model``: an encoder-decoder also decodes its own input."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {**batch, "decoder_input_ids": batch["input_ids"]}
    return batch


def position_limit(model: nn.Module) -> int | None:
    """The longest input the model's positions allow, where its config says (None: no fixed limit).

    Models whose position ids start after the padding index (RoBERTa, MPNet: ``padding_idx + 1``) have that
    many fewer positions than their table holds.
    """
    limit = next(
        (value for name in ("max_position_embeddings", "n_positions")
         if isinstance(value := getattr(model.config, name, None), int) and value > 0),
        None,
    )  # fmt: skip
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Embedding) and table.padding_idx is not None:
            offset_limit = table.num_embeddings - table.padding_idx - 1
            limit = offset_limit if limit is None else min(limit, offset_limit)
    return limit


def fit_to_positions(batch: dict, model: nn.Module) -> dict:
    """A right-padded batch cut to the model's position limit (its longest rows lose their last tokens)."""
    limit = position_limit(model)
    if limit is None or batch["input_ids"].shape[1] <= limit:
        return batch
    return {key: value[:, :limit] if value.dim() == 2 else value for key, value in batch.items()}

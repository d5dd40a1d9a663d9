"""Data-to-text inputs for causal-LM fine-tuning: readers for WebNLG 2017, E2E, DART and any text pairs.

Each reader returns :class:`Item` s: one linearised input with every reference text written for it
(references of the same input are grouped, so an input is one test item however many texts it has).
:func:`format_example` builds the prompt and target tokens with the prompt masked out of the loss.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..textfiles import jsonl_objects, read_text, table_rows

# The ten WebNLG 2017 categories with training data; the test set adds five unseen ones.
WEBNLG_SEEN = frozenset(
    "Airport Astronaut Building City ComicsCharacter Food Monument SportsTeam University WrittenWork".split()
)
PROMPT_END = "\nText:"


@dataclass
class Item:
    source: str  # the linearised input
    references: list[str]
    category: str | None = None  # WebNLG: the DBpedia category (seen in training or not)
    triples: int | None = None  # WebNLG, DART: how many triples the input holds
    index: int | None = None  # the entry's 0-based position among the file's entries

    @property
    def stratum(self) -> tuple:
        """What a stratified draw keeps in proportion (:mod:`mlp_fusion.training.subsets`)."""
        return (self.category or "", self.triples or 0)

    @property
    def seen(self) -> bool | None:
        return None if self.category is None else self.category in WEBNLG_SEEN


def linearise_triples(triples: list[tuple[str, str, str]]) -> str:
    """``subject : property : object | ...`` with underscores and quotes of DBpedia names removed."""

    def clean(text: str) -> str:
        return text.replace("_", " ").strip().strip('"').strip()

    return " | ".join(" : ".join(clean(part) for part in triple) for triple in triples)


def read_webnlg(path: Path) -> list[Item]:
    """WebNLG 2017: the flat JSONL (``modifiedtripleset`` strings, ``lex``) or the official challenge JSON."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        entries = [entry for _, entry in jsonl_objects(text, path)]
        items = []
        for number, entry in enumerate(entries, 1):
            try:
                triples = [tuple(part.strip() for part in t.split("|")) for t in entry["modifiedtripleset"]]
                references = [lex["text"] for lex in entry["lex"]]
            except (KeyError, TypeError, AttributeError):
                raise UserError(f"{path} entry {number} lacks 'modifiedtripleset' or 'lex' texts") from None
            items.append(_item(path, number, triples, references, entry.get("category")))
        return _non_empty(path, items)
    try:
        entries = [next(iter(entry.values())) for entry in json.loads(text)["entries"]]
        items = [
            _item(
                path,
                number,
                [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]],
                [lex["lex"] for lex in entry["lexicalisations"]],
                entry.get("category"),
            )
            for number, entry in enumerate(entries, 1)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise UserError(f"{path} is not WebNLG challenge JSON ({{'entries': [{{'1': {{...}}}}]}})") from None
    return _non_empty(path, items)


def read_e2e(path: Path) -> list[Item]:
    """E2E CSV (``mr``, ``ref``): rows with the same meaning representation become one item."""
    rows = _csv_rows(path, ("mr", "ref"))
    grouped: dict[str, list[str]] = {}
    for mr, ref in rows:
        grouped.setdefault(mr, []).append(ref)
    return _non_empty(path, [Item(_linearise_mr(path, mr), refs) for mr, refs in grouped.items()])


def read_dart(path: Path) -> list[Item]:
    """DART JSON: a list of ``{tripleset: [[s, p, o], ...], annotations: [{text}, ...]}``."""
    try:
        entries = json.loads(read_text(path))
        items = [
            _item(
                path,
                number,
                [tuple(t) for t in entry["tripleset"]],
                [a["text"] for a in entry["annotations"]],
            )
            for number, entry in enumerate(entries, 1)
        ]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not DART JSON (a list of {{tripleset, annotations}} objects)") from None
    return _non_empty(path, items)


def read_text2text(path: Path, source_column: str, target_column: str) -> list[Item]:
    """Any JSONL / CSV / TSV with a source and a target column; repeated sources are grouped."""
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for number, row in jsonl_objects(read_text(path), path):
            if source_column not in row or target_column not in row:
                raise UserError(f"{path} line {number} lacks {source_column!r} or {target_column!r}")
            rows.append((str(row[source_column]), str(row[target_column])))
    else:
        rows = _csv_rows(path, (source_column, target_column))
    grouped: dict[str, list[str]] = {}
    for source, target in rows:
        grouped.setdefault(source, []).append(target)
    return _non_empty(path, [Item(source, refs) for source, refs in grouped.items()])


def format_example(tokenizer, source: str, target: str | None, max_length: int) -> dict:
    """Prompt (``source`` + ``PROMPT_END``) and target tokens; labels are -100 on the prompt and padding.

    Without a target, the prompt alone (for generation). The prompt is cut from the left when too long,
    so the target always fits.
    """
    prompt = tokenizer(source + PROMPT_END, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id, *prompt]
    if target is None:
        ids = prompt[-max_length:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}
    answer = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = answer[: max_length // 2] if len(prompt) + len(answer) > max_length else answer
    prompt = prompt[-(max_length - len(answer)) :]
    ids = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer}


def _item(path, number, triples, references, category=None) -> Item:
    if not triples or any(len(t) != 3 for t in triples):
        raise UserError(f"{path} entry {number}: every triple needs a subject, a property and an object")
    references = [r.strip() for r in references if isinstance(r, str) and r.strip()]
    return Item(linearise_triples(triples), references, category, len(triples))


def _linearise_mr(path: Path, mr: str) -> str:
    pairs = re.findall(r"\s*([^\[\],]+)\[([^\]]*)\]", mr)
    if not pairs:
        raise UserError(f"{path}: meaning representation {mr[:60]!r} is not 'slot[value], ...'")
    return " | ".join(f"{slot.strip()} : {value.strip()}" for slot, value in pairs)


def _csv_rows(path: Path, columns: tuple[str, str]) -> list[tuple[str, str]]:
    lines = table_rows(read_text(path), path, header=False)
    names = lines[0][1] if lines else []
    fields = {name.lower(): index for index, name in enumerate(names)}
    missing = [c for c in columns if c.lower() not in fields]
    if missing:
        raise UserError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(names)})")
    source, target = (fields[c.lower()] for c in columns)
    return [(_field(row, source), _field(row, target)) for _, row in lines[1:]]


def _field(row: list[str], index: int) -> str:
    return row[index] if index < len(row) else ""


def _non_empty(path: Path, items: list[Item]) -> list[Item]:
    items = [replace(item, index=position) for position, item in enumerate(items) if item.references]
    if not items:
        raise UserError(f"{path} has no examples with a reference text")
    return items

"""Held-out texts of three domains (WebNLG 2017 references, E2E references, SST-2 sentences, from
../shared/data) and a model's perplexity on each: what the benchmarks that score a model before any task
share. Validation texts are for choices, test texts for results; TEXTS of each, drawn at random (seed 0)
from the file's distinct texts, because the files are sorted."""

from __future__ import annotations

import csv
import json
import random

from _report import ROOT

from mlp_fusion.diagnostics.perplexity import perplexity

DATA = ROOT.parent / "shared" / "data"
TEXTS = 200


def domains(split: str) -> dict[str, list[str]]:
    """The three domains' texts of ``split`` ("validation": the dev files; "test": the test files)."""
    test = split == "test"
    webnlg = DATA / "webnlg2017" / "enriched_v1.6_flat" / ("test.jsonl" if test else "dev.jsonl")
    with (DATA / "e2e" / ("testset_w_refs.csv" if test else "devset.csv")).open() as handle:
        references = [row["ref"] for row in csv.DictReader(handle)]
    sst2 = (DATA / "sst2" / ("test.tsv" if test else "dev.tsv")).read_text().splitlines()[1:]
    return {
        "webnlg": _draw([json.loads(line)["lex"][0]["text"] for line in webnlg.read_text().splitlines()]),
        "e2e": _draw(references),
        "sst2": _draw([line.split("\t")[1 if test else 0] for line in sst2]),
    }


def _draw(texts: list[str]) -> list[str]:
    texts = list(dict.fromkeys(text for text in texts if text.strip()))
    return [texts[index] for index in sorted(random.Random(0).sample(range(len(texts)), TEXTS))]


def measure(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    """Perplexity on each domain of ``texts``, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    scores = {name: perplexity(model, tokenizer, group)["perplexity"] for name, group in texts.items()}
    model.train(was_training)
    return scores

"""Held-out texts of three domains (WebNLG 2017 references, E2E references, SST-2 sentences, from
../shared/data) and a model's perplexity on each: what the benchmarks that score a model before any task
share. Validation texts are for choices, test texts for results; TEXTS of each, drawn at random (seed 0)
from the file's distinct texts, because the files are sorted."""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
from _report import ROOT

from mlp_fusion.diagnostics.perplexity import text_losses

DATA = ROOT.parent / "shared" / "data"
TEXTS = 200
MIN_WORDS = 8  # SST-2 training sentences shorter than this are phrases, not texts


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


def training_texts(count: int, seed: int) -> list[str]:
    """``count`` texts of the three domains that no split above holds, a third from each, drawn at random with
    ``seed``: WebNLG 2017 training references, E2E dev references (its training file is not in
    ../shared/data) and SST-2 training sentences of at least MIN_WORDS words (its training file also holds
    short phrases). What a user heals on with their own text (`--heal-data`); no test text is among them."""
    test = {text for group in domains("test").values() for text in group}
    webnlg = (DATA / "webnlg2017" / "enriched_v1.6_flat" / "train.jsonl").read_text().splitlines()
    with (DATA / "e2e" / "devset.csv").open() as handle:
        e2e = [row["ref"] for row in csv.DictReader(handle)]
    sst2 = [line.split("\t")[0] for line in (DATA / "sst2" / "train.tsv").read_text().splitlines()[1:]]
    pools = [
        [lex["text"] for line in webnlg for lex in json.loads(line)["lex"]],
        e2e,
        [text for text in sst2 if len(text.split()) >= MIN_WORDS],
    ]
    draw, texts = random.Random(seed), []
    for share, pool in zip((count - 2 * (count // 3), count // 3, count // 3), pools, strict=True):
        distinct = [text for text in dict.fromkeys(pool) if text.strip() and text not in test]
        texts += draw.sample(distinct, share)
    draw.shuffle(texts)
    return texts


def _draw(texts: list[str]) -> list[str]:
    texts = list(dict.fromkeys(text for text in texts if text.strip()))
    return [texts[index] for index in sorted(random.Random(0).sample(range(len(texts)), TEXTS))]


def measure_losses(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, list[list[float]]]:
    """Each domain's per-text ``[nll, predicted tokens]`` (in the order of ``texts``), the model in eval mode
    meanwhile: what :func:`ratio_interval` resamples."""
    was_training = model.training
    model.eval()
    scores = {
        name: [list(pair) for pair in text_losses(model, tokenizer, group)[0]]
        for name, group in texts.items()
    }
    model.train(was_training)
    return scores


def measure(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    """Perplexity on each domain of ``texts``."""
    return {name: perplexity_of(losses) for name, losses in measure_losses(model, tokenizer, texts).items()}


def over_original(scores: dict[str, float], original: dict[str, float]) -> float:
    """The geometric mean over domains of a model's perplexity over the original's."""
    logs = [math.log(scores[domain] / original[domain]) for domain in original]
    return math.exp(sum(logs) / len(logs))


def perplexity_of(losses: list[list[float]], rows=slice(None)) -> float:
    """The perplexity of the texts ``rows`` picks from per-text ``[nll, tokens]`` pairs."""
    pairs = np.asarray(losses, dtype=np.float64)[rows]
    return math.exp(pairs[:, 0].sum() / pairs[:, 1].sum())


def ratio_interval(
    runs: list[list[list[float]]], base: list[list[list[float]]], resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """The perplexity of ``runs`` over that of ``base`` (each a list of per-seed per-text losses, seeds paired
    by position; a single base run serves every seed) as the geometric mean over seeds, and its 95%
    paired-bootstrap interval over texts (every resample draws one multiset of texts for all seeds):
    (ratio, low, high)."""
    texts = len(runs[0])
    if any(len(run) != texts for run in (*runs, *base)):
        raise ValueError("every run must score the same texts")
    pairs = [(run, base[i] if len(base) > 1 else base[0]) for i, run in enumerate(runs)]

    def ratio(rows) -> float:
        return math.exp(
            sum(math.log(perplexity_of(run, rows) / perplexity_of(other, rows)) for run, other in pairs)
            / len(pairs)
        )

    draw = np.random.default_rng(seed)
    resampled = [ratio(draw.integers(0, texts, texts)) for _ in range(resamples)]
    low, high = np.percentile(resampled, [2.5, 97.5])
    return ratio(slice(None)), float(low), float(high)

"""Sampling calibration and healing texts: transformers' ``generate`` (top-p over the whole vocabulary, the
earlier sampler, 32 rows a batch) against ``mlp_fusion.sampling`` (128 rows a batch), the same count of
texts of at most 96 new tokens from the same start token, on SmolLM2-135M and Gemma-3-270M, taking turns;
then a plain ``compress`` of each (the default recipe) timed whole.

    python benchmarks/sampling.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish, run_header  # noqa: E402

from mlp_fusion import compress, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sampling.json"
COUNT = 128
SHAPES = {"smollm2": ("20-29", 0.5), "gemma3": ("9-17", 0.5)}


def with_generate(model, tokenizer, count: int, batch: int) -> int:
    """The earlier sampler: ``generate`` with top-p 0.95 and top-k off; returns the texts drawn."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    drawn = 0
    torch.manual_seed(0)
    for first in range(0, count, batch):
        ids = torch.full((min(batch, count - first), 1), start, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, top_k=0,
                max_new_tokens=96, eos_token_id=end, pad_token_id=end,
            )  # fmt: skip
        drawn += len(out)
    return drawn


def main() -> None:
    runs = {}
    for name in SHAPES:
        loaded = load_model(name)
        start = time.perf_counter()
        with_generate(loaded.model, loaded.tokenizer, COUNT, 32)
        before = time.perf_counter() - start
        start = time.perf_counter()
        texts = recipes.sample_texts(loaded.model, loaded.tokenizer, recipes.Sampling(count=COUNT))
        after = time.perf_counter() - start
        del loaded
        layers, ratio = SHAPES[name]
        start = time.perf_counter()
        compress(name, layers=layers, ratio=ratio)
        whole = time.perf_counter() - start
        runs[name] = {"generate_seconds": before, "sampler_seconds": after, "texts": len(texts),
                      "compress_seconds": whole, "layers": layers, "ratio": ratio}  # fmt: skip
        print(name, runs[name], file=sys.stderr, flush=True)
    results = {**run_header(), "count": COUNT, "runs": runs}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = [
        "| model | `generate`, 32 rows a batch | `mlp_fusion.sampling`, 128 rows a batch | speed-up | plain `compress` (shape) |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        table.append(
            f"| {name} | {run['generate_seconds']:.1f} s | {run['sampler_seconds']:.1f} s | "
            f"{run['generate_seconds'] / run['sampler_seconds']:.2f}x | {run['compress_seconds']:.1f} s "
            f"({run['layers']} at {run['ratio']}) |"
        )
    intro = (
        f"Drawing {COUNT} calibration texts (at most 96 new tokens, top-p 0.95, temperature 1) from each model "
        "in float32 on the CPU, the two samplers one after the other with nothing else running; then a plain "
        "`compress` with the default recipe (sampling, fusing in memory or layer by layer, saving nothing), "
        "timed whole. The two samplers draw from the same distribution but not the same texts."
    )
    print(publish("sampling", intro, table, results, RESULTS))


if __name__ == "__main__":
    main()

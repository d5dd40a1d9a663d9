"""Sampling calibration and healing texts: the sampler decoding the weights in float32 (the earlier default)
against a bfloat16 copy (the default), the same count of texts of at most 96 new tokens, taking turns, on
SmolLM2-135M and Gemma-3-270M; a plain ``compress`` of each (the default recipe) timed whole; what the
precision does to the compressed model (perplexity before any task on validation texts, compress fed the
float32 samples against compress as it is); and 1,000 healing texts from SmolLM2.

    python benchmarks/sampling.py          # nothing else may run while it measures
    python benchmarks/sampling.py report   # the section of BENCHMARKS.md again, from the saved results
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import domains, measure, over_original  # noqa: E402
from _report import ROOT, publish, run_header  # noqa: E402

from mlp_fusion import compress, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sampling.json"
COUNT, HEALING_COUNT = 128, 1000
SHAPES = {"smollm2": ("20-29", 0.5), "gemma3": ("9-17", 0.5)}
PRECISIONS = {"float32": None, "bfloat16": "bfloat16"}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def run_model(name: str, texts: dict) -> dict:
    loaded = load_model(name)
    run = {"layers": SHAPES[name][0], "ratio": SHAPES[name][1]}
    samples = {}
    for precision, dtype in PRECISIONS.items():
        sampling = recipes.fitted_sampling(recipes.Sampling(count=COUNT, dtype=dtype), loaded.model)
        samples[precision], run[f"{precision}_seconds"] = timed(
            recipes.sample_texts, loaded.model, loaded.tokenizer, sampling
        )
    if name == "smollm2":
        sampling = recipes.fitted_sampling(recipes.Sampling(count=HEALING_COUNT), loaded.model)
        _, run["healing_texts_seconds"] = timed(
            recipes.sample_texts, loaded.model, loaded.tokenizer, sampling
        )
    run["original_perplexity"] = measure(loaded.model, loaded.tokenizer, texts)
    del loaded
    layers, ratio = SHAPES[name]
    done, run["compress_seconds"] = timed(compress, name, layers=layers, ratio=ratio)
    run["bfloat16_perplexity"] = measure(done.model, done.tokenizer, texts)
    del done
    done = compress(name, layers=layers, ratio=ratio, calibration_texts=samples["float32"])
    run["float32_perplexity"] = measure(done.model, done.tokenizer, texts)
    print(name, {k: v for k, v in run.items() if "perplexity" not in k}, file=sys.stderr, flush=True)
    return run


def main() -> None:
    if sys.argv[1:] != ["report"]:
        texts = domains("validation")
        runs = {name: run_model(name, texts) for name in SHAPES}
        results = {**run_header(), "count": COUNT, "healing_count": HEALING_COUNT, "runs": runs}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    report(json.loads(RESULTS.read_text()))


def report(results: dict) -> None:
    """The section of BENCHMARKS.md, from the saved results."""
    runs = results["runs"]
    table = [
        f"| model | {COUNT} texts, float32 | {COUNT} texts, bfloat16 | speed-up | plain `compress` (shape) | "
        "x original, float32 samples | x original, bfloat16 samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        table.append(
            f"| {name} | {run['float32_seconds']:.1f} s | {run['bfloat16_seconds']:.1f} s | "
            f"{run['float32_seconds'] / run['bfloat16_seconds']:.2f}x | {run['compress_seconds']:.1f} s "
            f"({run['layers']} at {run['ratio']}) | {over_original(run['float32_perplexity'], run['original_perplexity']):.3f}x | "
            f"{over_original(run['bfloat16_perplexity'], run['original_perplexity']):.3f}x |"
        )
    smollm2 = runs["smollm2"]["healing_texts_seconds"]
    intro = (
        f"Drawing {COUNT} calibration texts (at most 96 new tokens, top-p 0.95, temperature 1, 128 rows a "
        "batch) from each model on the CPU, decoding the float32 weights or a bfloat16 copy of them (buffers "
        "such as rotary frequencies stay float32), taking turns, nothing else running; then a plain "
        "`compress` with the default recipe (bfloat16 sampling, fusing, saving nothing), timed whole. The two "
        "precisions draw from nearly the same distribution but not the same texts. Perplexity before any "
        "task over the original's (geometric mean of WebNLG 2017 dev, E2E dev and SST-2 dev, 200 texts each "
        "drawn at random): the default compress fed the float32 samples against the default compress as it "
        "is (bfloat16 samples); one sampling seed, no interval. "
        f"{HEALING_COUNT} healing texts from SmolLM2 in bfloat16 took {smollm2:.0f} s (goal: under 300 s); "
        f"the plain `compress` of Gemma-3 took {runs['gemma3']['compress_seconds']:.0f} s (goal: under 120 s)."
    )
    print(publish("sampling", intro, table, results, RESULTS))


if __name__ == "__main__":
    main()

"""Block reconstruction: does fitting each fused layer toward the original model's layer output help?

SmolLM2 compressed as `mlp-fusion compress smollm2 --layers 20-29 --ratio 0.5` makes it (the calibrated
recipe, its 128 texts sampled once from the model, seed 0, and given to every candidate), without and with
`block_steps` at two step counts and two Adam rates (`mlp_fusion.block_fit.BLOCK_LR`, relative to each
weight's RMS). Rule, fixed before the runs: the candidate with the lowest validation perplexity over the
original's (geometric mean of the three domains of `benchmarks/_held_out.py`) is chosen; it is kept only
if it is lower than no fit at all. The chosen candidate and no fit are then measured once on the test texts.
Resumable: each candidate is saved as it finishes. `--model gemma3` checks the SmolLM2 choice on
Gemma-3-270M at layers 12-17 / 0.5: no fit and the chosen candidate only, on both splits.

    python benchmarks/block_fit.py
    python benchmarks/block_fit.py --model gemma3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import domains, measure, over_original  # noqa: E402
from _report import ROOT, publish, write_results  # noqa: E402

import mlp_fusion  # noqa: E402
from mlp_fusion import block_fit, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

MODELS = {"smollm2": ("20-29", 0.5), "gemma3": ("12-17", 0.5)}  # layers and ratio
NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}
CANDIDATES = {  # name: (block_steps, BLOCK_LR)
    "no fit": (0, block_fit.BLOCK_LR),
    "100 steps, 1e-3": (100, 1e-3),
    "300 steps, 1e-3": (300, 1e-3),
    "100 steps, 1e-2": (100, 1e-2),
    "300 steps, 1e-2": (300, 1e-2),
}


def raw(model: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"block-fit-{model}.json"


def candidate(model: str, texts: list[str], steps: int, rate: float, split_texts: dict) -> dict:
    block_fit.BLOCK_LR = rate
    layers, ratio = MODELS[model]
    start = time.perf_counter()
    done = mlp_fusion.compress(
        model, None, calibration_texts=texts, layers=layers, ratio=ratio, block_steps=steps
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "perplexity": measure(done.model, done.tokenizer, split_texts)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=MODELS)
    parser.add_argument("--report", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    model = args.model
    if args.report:
        print(report(model, json.loads(raw(model).read_text())))
        return
    torch.set_num_threads(2)
    results = json.loads(raw(model).read_text()) if raw(model).is_file() else {"validation": {}, "test": {}}
    loaded = load_model(model)
    sampling = recipes.fitted_sampling(recipes.RECIPES["calibrated"].sampling, loaded.model)
    texts = recipes.sample_texts(loaded.model, loaded.tokenizer, sampling)
    for split in ("validation", "test"):
        split_texts = domains(split)
        if "original" not in results[split]:
            results[split]["original"] = {"perplexity": measure(loaded.model, loaded.tokenizer, split_texts)}
        for name in candidates(model, split, results):
            if name not in results[split]:
                results[split][name] = candidate(model, texts, *CANDIDATES[name], split_texts)
                fields = {"validation": results["validation"], "test": results["test"]}
                results = write_results(raw(model), fields)
                print(split, name, results[split][name], flush=True)
    print(report(model, results))


def candidates(model: str, split: str, results: dict) -> list[str]:
    """The whole grid on SmolLM2's validation texts; elsewhere no fit and the one SmolLM2 chose."""
    if model == "smollm2" and split == "validation":
        return list(CANDIDATES)
    return ["no fit", chosen(results if model == "smollm2" else json.loads(raw("smollm2").read_text()))]


def chosen(results: dict) -> str:
    validation = results["validation"]
    ratios = {
        name: over_original(validation[name]["perplexity"], validation["original"]["perplexity"])
        for name in CANDIDATES
    }
    return min(ratios, key=ratios.get)


def report(model: str, results: dict) -> str:
    pick = chosen(results) if model == "smollm2" else candidates(model, "test", results)[1]
    table = [
        "| split | candidate | WebNLG | E2E | SST-2 | x original (geometric mean) | compress s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for split in ("validation", "test"):
        original = results[split].get("original", {}).get("perplexity")
        for name, row in results[split].items():
            scores = row["perplexity"]
            ratio = "-" if name == "original" else f"{over_original(scores, original):.3f}x"
            seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
            cells = " | ".join(f"{scores[d]:.1f}" for d in ("webnlg", "e2e", "sst2"))
            table.append(f"| {split} | {name} | {cells} | {ratio} | {seconds} |")
    layers, ratio = MODELS[model]
    intro = (
        f"{NAMES[model]} compressed as `mlp-fusion compress {model} --layers {layers} --ratio {ratio}` makes "
        "it (the calibrated recipe; its 128 texts sampled once from the model, seed 0, given to every "
        "candidate), without and with block reconstruction (`--block-steps`: each fused layer's MLP weights "
        "fitted, the scales kept, so that the whole layer on the fused layers' outputs gives the original "
        f"model's layer output), {grid(model)}. Perplexity on 200 texts per domain drawn at random "
        f"(`benchmarks/_held_out.py`){chosen_on(model)} One sampling seed, no interval. {verdict(model, pick)}"
        + NOTES.get(model, "")
    )
    return publish(f"block-fit-{model}", intro, table, results, raw(model))


NOTES = {
    "smollm2": " Compress seconds (loading, fusing and the fit; not the sampling) of the first two validation "
    "rows ran while a fine-tuning run shared the CPU, which slowed them several-fold; the rest ran alone."
}


def verdict(model: str, pick: str) -> str:
    if model != "smollm2":
        return f"Checked: **{pick}**."
    if pick == "no fit":
        return "**Chosen: no fit** (no candidate beat no fit: not kept)."
    return (
        f"**Chosen: {pick}** (it beat no fit on validation: the rate is `BLOCK_LR`'s, and `--block-steps` an "
        "option, not part of the default recipe)."
    )


def grid(model: str) -> str:
    if model == "smollm2":
        return "at two step counts and two Adam rates relative to each weight's RMS"
    return "with the candidate chosen on SmolLM2's validation texts (the section above)"


def chosen_on(model: str) -> str:
    if model == "smollm2":
        return ": the candidate is chosen on validation texts and measured once on test texts."
    return ", validation and test, no choice made on either."


if __name__ == "__main__":
    main()

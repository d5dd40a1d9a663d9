"""Block reconstruction: does fitting each fused layer toward the original model's layer output help?

SmolLM2 compressed as `mlp-fusion compress smollm2 --layers 20-29 --ratio 0.5` makes it (the calibrated
recipe, its 128 texts sampled once from the model, seed 0, and given to every candidate), without and with
`block_steps` at two step counts and two Adam rates (`mlp_fusion.block_fit.BLOCK_LR`, relative to each
weight's RMS). Rule, fixed before the runs: the candidate with the lowest validation perplexity over the
original's (geometric mean of the three domains of `benchmarks/_held_out.py`) is chosen; it is kept only
if it is lower than no fit at all. The chosen candidate and no fit are then measured once on the test texts.
Resumable: each candidate is saved as it finishes.

    python benchmarks/block_fit.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import domains, measure, over_original  # noqa: E402
from _report import ROOT, publish, rewrite_only, write_results  # noqa: E402

import mlp_fusion  # noqa: E402
from mlp_fusion import block_fit, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RAW = ROOT / "benchmarks" / "results" / "block-fit-smollm2.json"
CANDIDATES = {  # name: (block_steps, BLOCK_LR)
    "no fit": (0, block_fit.BLOCK_LR),
    "100 steps, 1e-3": (100, 1e-3),
    "300 steps, 1e-3": (300, 1e-3),
    "100 steps, 1e-2": (100, 1e-2),
    "300 steps, 1e-2": (300, 1e-2),
}


def candidate(texts: list[str], steps: int, rate: float, split_texts: dict) -> dict:
    block_fit.BLOCK_LR = rate
    start = time.perf_counter()
    done = mlp_fusion.compress(
        "smollm2", None, calibration_texts=texts, layers="20-29", ratio=0.5, block_steps=steps
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "perplexity": measure(done.model, done.tokenizer, split_texts)}


def main() -> None:
    if rewrite_only(__doc__, RAW, report):
        return
    torch.set_num_threads(2)
    results = json.loads(RAW.read_text()) if RAW.is_file() else {"validation": {}, "test": {}}
    loaded = load_model("smollm2")
    sampling = recipes.fitted_sampling(recipes.RECIPES["calibrated"].sampling, loaded.model)
    texts = recipes.sample_texts(loaded.model, loaded.tokenizer, sampling)
    for split in ("validation", "test"):
        split_texts = domains(split)
        if "original" not in results[split]:
            results[split]["original"] = {"perplexity": measure(loaded.model, loaded.tokenizer, split_texts)}
        names = CANDIDATES if split == "validation" else ["no fit", chosen(results)]
        for name in names:
            if name not in results[split]:
                results[split][name] = candidate(texts, *CANDIDATES[name], split_texts)
                results = write_results(RAW, {"validation": results["validation"], "test": results["test"]})
                print(split, name, results[split][name], flush=True)
    print(report(results))


def chosen(results: dict) -> str:
    validation = results["validation"]
    ratios = {
        name: over_original(validation[name]["perplexity"], validation["original"]["perplexity"])
        for name in CANDIDATES
    }
    return min(ratios, key=ratios.get)


def report(results: dict) -> str:
    pick = chosen(results)
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
    kept = (
        "it beat no fit on validation: the rate is `BLOCK_LR`'s, and `--block-steps` an option, not part of "
        "the default recipe"
        if pick != "no fit"
        else "no candidate beat no fit: not kept"
    )
    intro = (
        "SmolLM2-135M compressed as `mlp-fusion compress smollm2 --layers 20-29 --ratio 0.5` makes it (the "
        "calibrated recipe; its 128 texts sampled once from the model, seed 0, given to every candidate), "
        "without and with block reconstruction (`--block-steps`: each fused layer's MLP weights fitted, the "
        "scales kept, so that the whole layer on the fused layers' outputs gives the original model's layer "
        "output), at two step counts and two Adam rates relative to each weight's RMS. Perplexity on 200 "
        "texts per domain drawn at random (`benchmarks/_held_out.py`): the candidate is chosen on validation "
        f"texts and measured once on test texts. One sampling seed, no interval. **Chosen: {pick}** ({kept}). "
        "Compress seconds (loading, fusing and the fit; not the sampling) of the first two validation rows "
        "ran while a fine-tuning run shared the CPU, which slowed them several-fold; the rest ran alone."
    )
    return publish("block-fit-smollm2", intro, table, results, RAW)


if __name__ == "__main__":
    main()

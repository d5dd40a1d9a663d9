"""What a user gets from ``compress`` with no flag but layers and ratio: SmolLM2-135M, perplexity before fine-tuning.

For each WebNLG fine-tuning setting (S1: layers 20-29 at 0.5, S2: layers 10-29 at 0.25), the perplexity of
200 held-out WebNLG dev texts (dev 100-299, as in ``decoder.py perplexity``) for: the original model; the
default recipe (``mlp_fusion.compress`` as the command runs it: 128 texts sampled from the model as
calibration, fusion with half of each fused width kept); the paper recipe (``--recipe paper``: data-free
fusion, the old default); calibrated pruning on the same sampled texts; and, for reference, the default
recipe and calibrated pruning on 128 in-domain texts (the first WebNLG train texts). Rows are saved as they
finish and a rerun skips them.

    python benchmarks/default_recipe.py                  # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder import webnlg_texts  # noqa: E402
from kmeans import publish, run_header  # noqa: E402

from mlp_fusion import compress  # noqa: E402
from mlp_fusion.diagnostics.perplexity import perplexity  # noqa: E402
from mlp_fusion.fuse import fusion_records  # noqa: E402
from mlp_fusion.models import load_model  # noqa: E402
from mlp_fusion.recipes import RECIPE_ATTR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "default-recipe-smollm2.json"
SETTINGS = {"S1": ("20-29", 0.5), "S2": ("10-29", 0.25)}
# label -> (recipe, method, calibration: "sampled" (the recipe's own), "in-domain" or None)
ROWS = {
    "default (calibrated recipe, sampled texts)": ("auto", "fusion", "sampled"),
    "paper recipe (data-free fusion)": ("paper", "fusion", None),
    "prune+calibration, sampled texts": ("calibrated", "prune", "sampled"),
    "default recipe, in-domain texts": ("auto", "fusion", "in-domain"),
    "prune+calibration, in-domain texts": ("calibrated", "prune", "in-domain"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    results.update(run_header())
    texts = webnlg_texts("dev", 100, 200)
    in_domain = webnlg_texts("train", 0, 128)
    if not args.report:
        measure(results, texts, in_domain)
    print(report(results))


def measure(results: dict, texts: list[str], in_domain: list[str]) -> None:
    rows = results["rows"]
    if "original" not in rows:
        loaded = load_model("smollm2")
        rows["original"] = perplexity(loaded.model, loaded.tokenizer, texts)
        save(results)
    sampled = None
    for setting, (layers, ratio) in SETTINGS.items():
        for label, (recipe, method, calibration) in ROWS.items():
            key = f"{label} | {setting}"
            if key in rows:
                continue
            given = in_domain if calibration == "in-domain" else sampled if calibration == "sampled" else None
            start = time.perf_counter()
            done = compress(
                "smollm2", recipe=recipe, method=method, layers=layers, ratio=ratio, calibration_texts=given
            )
            seconds = time.perf_counter() - start
            if calibration == "sampled" and sampled is None:
                sampled = getattr(done.model, RECIPE_ATTR)["samples"]  # the same for every later row
            rows[key] = {
                **perplexity(done.model, done.tokenizer, texts),
                "seconds": seconds,
                "params": done.report.params_after,
                "keep_fraction": fusion_records(done.model)[0].settings["keep_fraction"],
            }
            save(results)
            print(key, rows[key]["perplexity"], file=sys.stderr, flush=True)


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict) -> str:
    rows = results["rows"]
    original = rows["original"]["perplexity"]
    lines = [
        "| setting | row | perplexity | x original | keep fraction | seconds |",
        "|---|---|---|---|---|---|",
        f"| - | original | {original:.1f} | 1.00 | - | - |",
    ]
    for key, row in rows.items():
        if key == "original":
            continue
        label, _, setting = key.partition(" | ")
        lines.append(
            f"| {setting} | {label} | {row['perplexity']:.1f} | {row['perplexity'] / original:.2f} "
            f"| {row['keep_fraction']} | {row['seconds']:.0f} |"
        )
    intro = (
        "SmolLM2-135M compressed as `mlp_fusion.compress` (the library verb behind `mlp-fusion compress`) "
        "does it, no fine-tuning: perplexity of 200 held-out WebNLG dev texts. S1: layers 20-29 at 0.5; S2: "
        "layers 10-29 at 0.25. The default recipe samples 128 texts from the model (from its BOS token, "
        "top-p 0.95, 96 new tokens, seed 0) as calibration and keeps half of each fused width as its "
        "top-scored neurons; calibrated pruning uses the same sampled texts; the in-domain rows use the "
        "first 128 WebNLG train texts instead. Seconds include sampling and were measured while other "
        "benchmarks shared the CPU."
    )
    return publish("default-recipe-smollm2", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

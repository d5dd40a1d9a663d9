"""Where a budget's time goes: ``compress smollm2 --size 0.9`` (a budget over every layer, the default recipe,
calibrated on 128 texts sampled once) fused on layer walks (one over the unfused layers for the error curves,
one for the fusion) against the earlier path, the whole model run from its start for every site (three times
per site: its curve, its fusion, its refit); taking turns, nothing else running. Both must give the same
widths and the same tensors.

    python benchmarks/budget_planning.py          # about 25 minutes on 2 cores
    python benchmarks/budget_planning.py report   # the section of BENCHMARKS.md again, from the saved results
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish, run_header  # noqa: E402

from mlp_fusion import compress, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "budget-planning.json"
MODEL, SIZE = "smollm2", 0.9
PATHS = {
    "layer walks": None,
    # the earlier path: with the walk declined, every site runs the whole model from its start
    "whole model per site": lambda *args, **kwargs: None,
}


def timed_compress(texts: list[str], path) -> tuple[dict, dict]:
    """The fused model's tensors and the run's record (its widths and the seconds compress took)."""
    patch = (
        mock.patch.object(importlib.import_module("mlp_fusion.fuse"), "fuse_walking", path)
        if path
        else contextlib.nullcontext()
    )
    with patch:
        start = time.perf_counter()
        done = compress(MODEL, size=SIZE, calibration_texts=texts)
        seconds = time.perf_counter() - start
    widths = [row.width_after for row in done.report.layers]
    return done.model.state_dict(), {"widths": widths, "seconds": seconds}


def main() -> None:
    if sys.argv[1:] != ["report"]:
        loaded = load_model(MODEL)
        sampling = recipes.fitted_sampling(recipes.Sampling(), loaded.model)
        texts = recipes.sample_texts(loaded.model, loaded.tokenizer, sampling)
        del loaded
        runs, tensors = {}, {}
        for name, path in PATHS.items():
            tensors[name], runs[name] = timed_compress(texts, path)
            print(name, f"{runs[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
        first, second = tensors.values()
        difference = max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(first.values(), second.values())
        )
        del tensors, first, second
        results = {**run_header(), "model": MODEL, "size": SIZE, "texts": len(texts), "runs": runs,
                   "same_widths": runs["layer walks"]["widths"] == runs["whole model per site"]["widths"],
                   "largest_tensor_difference": difference}  # fmt: skip
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    report(json.loads(RESULTS.read_text()))


def report(results: dict) -> None:
    runs = results["runs"]
    walk, whole = runs["layer walks"]["seconds"], runs["whole model per site"]["seconds"]
    table = [
        "| path | compress seconds | speed-up |",
        "|---|---:|---:|",
        f"| whole model per site (earlier) | {whole:.0f} | 1.00x |",
        f"| layer walks | {walk:.0f} | {whole / walk:.2f}x |",
    ]
    intro = (
        f"`compress {results['model']} --size {results['size']}` in the library (a budget over every layer, "
        f"the default recipe, {results['texts']} calibration texts sampled once and given to both, saving "
        "nothing), timed whole, the two paths taking turns with nothing else running. Same widths: "
        f"{'yes' if results['same_widths'] else 'NO'}; largest difference of any tensor: "
        f"{results['largest_tensor_difference']:.1e}."
    )
    print(publish("budget-planning", intro, table, results, RESULTS))


if __name__ == "__main__":
    main()

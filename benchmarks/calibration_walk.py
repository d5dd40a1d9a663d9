"""Calibrated fusion in memory: the layers walked once against the whole model run for every site.

SmolLM2-135M, 128 WebNLG training texts as calibration (at most 128 tokens), calibrated fusion (keep fraction
0.5, the output refit at ridge 0.1), at S1 (layers 20-29 at 0.5) and S2 (layers 10-29 at 0.25). For each
setting and round, the two paths take turns on fresh copies of the model: ``fuse(model, config,
calibration=batch)`` (what ``compress`` and ``finetune`` run: each layer on the hidden states the one before
produced) and ``fuse(..., calibration=ModelRuns(model, batch))`` (the whole model from its start for every
site, as before). Both must give identical tensors; the script stops otherwise.

    python benchmarks/calibration_walk.py            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, write_results  # noqa: E402
from decoder import webnlg_texts  # noqa: E402

import mlp_fusion  # noqa: E402
from mlp_fusion.calibration import ModelRuns, calibration_batch  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "calibration-walk-smollm2.json"
SETTINGS = {"S1": ("20-29", 0.5), "S2": ("10-29", 0.25)}
PATHS = ("layers walked once", "whole model per site")


def timed(model: torch.nn.Module, config: mlp_fusion.FusionConfig, batch: dict, path: str) -> float:
    calibration = batch if path == PATHS[0] else ModelRuns(model, batch)
    start = time.perf_counter()
    mlp_fusion.fuse(model, config, calibration=calibration)
    return time.perf_counter() - start


def measure(rounds: int) -> dict:
    loaded = load_model("smollm2")
    batch = calibration_batch(loaded.tokenizer, webnlg_texts("train", 0, 128), max_length=128)
    rows = {}
    for setting, (layers, ratio) in SETTINGS.items():
        config = mlp_fusion.FusionConfig(ratio=ratio, layers=layers, keep_fraction=0.5)
        seconds: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(rounds):
            models = {}
            for path in PATHS:
                models[path] = copy.deepcopy(loaded.model)
                seconds[path].append(timed(models[path], config, batch, path))
            walked, whole = (models[path].state_dict() for path in PATHS)
            if not all(torch.equal(walked[k], whole[k]) for k in walked):
                raise SystemExit(f"{setting}: the two paths gave different tensors")
        rows[setting] = {path: statistics.median(values) for path, values in seconds.items()}
        rows[setting]["every_round"] = seconds
        print(setting, rows[setting], flush=True)
    return {"rows": rows, "rounds": rounds, "tokens": int(batch["attention_mask"].sum())}


def report(results: dict) -> str:
    lines = [
        f"| setting | {PATHS[0]} (s) | {PATHS[1]} (s) | speed-up | tensors |",
        "|---|---|---|---|---|",
    ]
    for setting, row in results["rows"].items():
        walked, whole = row[PATHS[0]], row[PATHS[1]]
        lines.append(f"| {setting} | {walked:.0f} | {whole:.0f} | {whole / walked:.1f}x | identical |")
    intro = (
        "Calibrated fusion of SmolLM2-135M in memory (what `compress --in-memory`, `finetune` and "
        "`mlp_fusion.fuse(model, config, calibration=batch)` run): 128 WebNLG training texts "
        f"({results['tokens']:,} tokens), calibrated fusion with keep fraction 0.5 and the output refit "
        "(ridge 0.1; the ridge weight does not change the work). "
        "S1: layers 20-29 at 0.5; S2: layers 10-29 at 0.25. The layers walked once (each layer runs on the "
        "hidden states the one before produced) against the whole model run from its start for every "
        f"site; the two take turns on fresh copies of the model, median of {results['rounds']} round(s), and "
        "the script checks that both give identical tensors."
        + (
            " Other work shared the CPU during this run: the ratio is the result, not the seconds."
            if results.get("shared_cpu")
            else ""
        )
    )
    return publish("calibration-walk", intro, lines, results, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    parser.add_argument("--shared-cpu", action="store_true", help="say that other work shared the CPU")
    args = parser.parse_args()
    if args.report:
        import json

        print(report(json.loads(RESULTS.read_text())))
        return
    print(report(write_results(RESULTS, {**measure(args.rounds), "shared_cpu": args.shared_cpu})))


if __name__ == "__main__":
    main()

"""What each compression keeps of a gated decoder (SmolLM2-135M; ``--model gemma3``: Gemma-3-270M), before any fine-tuning.

1. ``ntk``: layers 25-29 and 10-29, ratios 0.25 and 0.5, 32 WebNLG dev texts as probes, seeds 0, 1 and 2 of
   the methods that draw random numbers (``--seeds 0`` for one): final output error, mean fused-layer
   output error, Adam-kernel error over the fused MLPs' tensors, for every variant below (``--rows`` and
   ``--settings`` rerun some of them, keeping the results file's other rows).
2. ``perplexity``: perplexity of held-out WebNLG dev texts (200, none of them probes) for the original model
   and every variant at layers 20-29 / ratio 0.5 and layers 10-29 / ratio 0.25 (the WebNLG fine-tuning
   settings), plus budget allocation at the same parameter count.
Calibration rows use the first 128 WebNLG train texts; timings are in the results file. mmd (200 Adam steps
per site) runs only on the smaller layer set of each part, to keep the run within an hour.

    python benchmarks/decoder.py ntk          # about 45 minutes on 2 cores
    python benchmarks/decoder.py perplexity   # about 25 minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import in_setting_order, machine, publish  # noqa: E402

from mlp_fusion import FusionConfig, fuse  # noqa: E402
from mlp_fusion.batches import probe_batch  # noqa: E402
from mlp_fusion.calibration import calibration_batch  # noqa: E402
from mlp_fusion.diagnostics import compare_methods  # noqa: E402
from mlp_fusion.diagnostics.perplexity import perplexity  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402
from mlp_fusion.records import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "webnlg2017" / "enriched_v1.6_flat"
PROBES = 32
# per model: the ntk settings (most telling first) and the two settings of the WebNLG fine-tuning benchmark,
# which keep the same number of MLP parameters; SmolLM2 has 30 layers, Gemma-3-270M 18
SETTINGS = {
    "smollm2": {
        "ntk": (("25-29", 0.25), ("10-29", 0.25), ("25-29", 0.5), ("10-29", 0.5)),
        "perplexity": (("20-29", 0.5), ("10-29", 0.25)),
    },
    "gemma3": {
        "ntk": (("15-17", 0.25), ("6-17", 0.25), ("15-17", 0.5), ("6-17", 0.5)),
        "perplexity": (("12-17", 0.5), ("6-17", 0.25)),
    },
}
SLOW = {"mmd"}  # variants run on the first (smaller) layer set only
KEEP_SHARES = (0.25, 0.5, 0.75)  # --keep-fraction: the top-scored share of the width kept exactly
# label -> (method, extra FusionConfig fields, calibrated, depends on the seed)
VARIANTS = {
    "fusion": ("fusion", {}, False, True),
    "fusion (raw)": ("fusion", {"canonical": False}, False, True),
    "fusion+calibration": ("fusion", {}, True, True),
    **{
        f"fusion+calibration+keep {share}": ("fusion", {"keep_fraction": share}, True, True)
        for share in KEEP_SHARES
    },
    "fold": ("fold", {}, False, True),
    "cluster": ("cluster", {}, False, True),
    "mmd": ("mmd", {}, False, True),
    "prune": ("prune", {}, False, False),
    "prune+calibration": ("prune", {}, True, False),
    "sketch": ("sketch", {}, False, True),
    "svd": ("svd", {}, False, False),
}
BUDGET_VARIANTS = {
    "fusion, budget": ("fusion", {}, False, True),
    "fusion+calibration, budget": ("fusion", {}, True, True),
    "prune+calibration, budget": ("prune", {}, True, False),
}


def webnlg_texts(split: str, start: int, count: int) -> list[str]:
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
    return [row["lex"][0]["text"] for row in rows[start : start + count]]


def ntk(loaded, calibration: dict, record: callable, seeds: tuple[int, ...], only, settings, saved) -> dict:
    """Every variant in every setting; with ``only``, just those variants, the other rows kept from ``saved``."""
    batch = probe_batch(loaded.model, loaded.tokenizer, count=PROBES, texts=webnlg_texts("dev", 0, PROBES))
    results = dict(saved)
    for layers, ratio in settings:
        reference = None
        for label, (method, options, calibrated, seeded) in VARIANTS.items():
            if label in SLOW and layers != settings[0][0] or only and label not in only:
                continue
            runs = []
            for seed in seeds if seeded else seeds[:1]:
                result = compare_methods(
                    loaded.model, batch, methods=[method], ratios=[ratio], layers=layers,
                    kernels=("adam",), params="fused", seed=seed, fusion_options=options,
                    calibration=calibration if calibrated else None, reference=reference,
                )  # fmt: skip
                reference = result["reference"]
                runs.append({**result["rows"][0], "probes": PROBES, "seed": seed})
            key = f"{label} | {layers} | {ratio}"
            results[key] = runs
            record(results)  # every finished row is kept, so a stopped run still reports
            print(key, summary(runs), file=sys.stderr, flush=True)
    return results


def summary(runs: list[dict]) -> dict:
    keys = ("output_error", "layer_output_error", "adam_error", "seconds")
    out = {key: statistics.mean(run[key] for run in runs) for key in keys}
    out.update(
        {f"{key}_std": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0 for key in keys}
    )
    return {**out, "runs": len(runs), "probes": runs[0]["probes"], "params": runs[0]["params"]}


def perplexities(loaded, calibration: dict, record: callable, only: set[str] | None, settings, saved) -> dict:
    """Every variant's perplexity; with ``only``, just those variants, the other rows kept from ``saved``."""
    texts = webnlg_texts("dev", 100, 200)
    scores = dict(saved)
    if "original" not in scores:
        scores["original"] = {**perplexity(loaded.model, loaded.tokenizer, texts), "seconds": 0.0}
        print("original", scores["original"]["perplexity"], file=sys.stderr, flush=True)
    for layers, ratio in settings:
        rows = [(label, spec, {"ratio": ratio}) for label, spec in VARIANTS.items()]
        rows += [(label, spec, {"budget": ratio}) for label, spec in BUDGET_VARIANTS.items()]
        for label, (method, options, calibrated, _), size in rows:
            if label in SLOW and layers != settings[0][0] or only and label not in only:
                continue
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            config = FusionConfig(method=method, layers=layers, **size, **options)
            report = fuse(model, config, calibration=calibration if calibrated else None)
            seconds = time.perf_counter() - start
            score = perplexity(model, loaded.tokenizer, texts)
            key = f"{label} | {layers} | {ratio}"
            widths = sorted({row.width_after for row in report.layers})
            scores[key] = {
                **score,
                "seconds": seconds,
                "params": count_parameters(model),
                "widths": widths,
            }
            print(key, round(score["perplexity"], 2), round(seconds, 1), file=sys.stderr, flush=True)
            record(scores)
            del model
    return scores


def ntk_table(results: dict) -> str:
    lines = [
        "| method | layers | ratio | output error | mean layer error | Adam-kernel error | runs | probes | s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        label, layers, ratio = key.split(" | ")
        s = summary(runs)
        keys = ("output_error", "layer_output_error", "adam_error")
        cells = [f"{s[k]:.3f}" + (f" ± {s[k + '_std']:.3f}" if s["runs"] > 1 else "") for k in keys]
        lines.append(
            f"| {label} | {layers} | {ratio} | "
            + " | ".join(cells)
            + f" | {s['runs']} | {s['probes']} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


def perplexity_table(scores: dict) -> str:
    lines = [
        "| method | layers | ratio or budget | perplexity | parameters | widths | fusion s |",
        "|---|---|---|---|---|---|---|",
    ]
    original = scores["original"]
    lines.append(f"| original | - | - | {original['perplexity']:.2f} | - | - | - |")
    for key, s in in_setting_order(scores, lambda key: key.partition(" | ")[2]):
        if key == "original":
            continue
        label, layers, ratio = key.split(" | ")
        widths = (
            ", ".join(map(str, s["widths"]))
            if len(s["widths"]) <= 4
            else f"{min(s['widths'])}-{max(s['widths'])}"
        )
        lines.append(
            f"| {label} | {layers} | {ratio} | {s['perplexity']:.2f} | {s['params']:,} | {widths} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


def pairs(settings: tuple) -> str:
    return ";".join(f"{layers}:{ratio}" for layers, ratio in settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=("ntk", "perplexity"))
    parser.add_argument("--model", default="smollm2", choices=SETTINGS)
    parser.add_argument("--seeds", default="0,1,2", help="ntk: comma-separated seeds of the seeded methods")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite BENCHMARKS.md from the results file"
    )
    parser.add_argument(
        "--rows", help="variants to (re)run, separated by ;, keeping the results file's other rows"
    )
    parser.add_argument(
        "--settings",
        help="layers:ratio pairs separated by ; (default, SmolLM2: "
        f"{pairs(SETTINGS['smollm2']['ntk'])} for ntk, {pairs(SETTINGS['smollm2']['perplexity'])} for perplexity)",
    )
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / f"decoder-{args.part}-{args.model}.json"
    if args.report:
        saved = json.loads(out.read_text())
        print(write_report(args.part, saved, out))
        return
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    loaded = load_model(args.model)
    calibration = calibration_batch(loaded.tokenizer, webnlg_texts("train", 0, 128), max_length=64)
    info = machine()
    command = "python benchmarks/decoder.py " + shlex.join(sys.argv[1:])
    only = set(args.rows.split(";")) if args.rows else None
    partial = only or args.settings
    earlier = json.loads(out.read_text()) if partial and out.is_file() else None
    if earlier is not None:  # a partial rerun: say which rows are newer than the rest
        command = f"{earlier['command']}` ({earlier['date']}, {earlier['machine']['cpu']}), then `{command}"

    def record(results: dict) -> str:
        saved = {"command": command, "date": date.today().isoformat(), "machine": info, "results": results}
        out.write_text(json.dumps(saved, indent=2) + "\n")
        return write_report(args.part, saved, out)

    settings = SETTINGS[args.model][args.part]
    if args.settings:
        settings = tuple((s.split(":")[0], float(s.split(":")[1])) for s in args.settings.split(";"))
    saved = earlier["results"] if earlier else {}
    if args.part == "ntk":
        results = ntk(loaded, calibration, record, seeds, only, settings, saved)
    else:
        results = perplexities(loaded, calibration, record, only, settings, saved)
    print(record(results))


def write_report(part: str, saved: dict, out: Path) -> str:
    """The results as a Markdown table with its provenance, written into BENCHMARKS.md."""
    results = saved["results"]
    table = ntk_table(results) if part == "ntk" else perplexity_table(results)
    return publish(out.stem, "", table.splitlines(), saved, out)


if __name__ == "__main__":
    main()

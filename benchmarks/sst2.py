"""Fine-tuning MiniLM-L6 on SST-2: full model vs fused and baseline-compressed models, several seeds.

Every row fine-tunes with the same settings through ``mlp-fusion finetune`` in its own process (so peak
memory is that run's): layers 2-5 of 6 at ratio 0.25, the first --train examples of the SST-2 train set,
evaluation on the whole dev set (872) after every epoch, the best epoch kept. ``full`` is the baseline.

    python benchmarks/sst2.py                          # 8 rows x 3 seeds; about an hour on 2 cores
    python benchmarks/sst2.py --rows full,fusion --seeds 0

Finished runs are kept in benchmarks/results/sst2-minilm.json and skipped when the script runs again
with the same settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_cli, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("..") / "shared" / "data" / "sst2"  # relative to ROOT, where every run starts
RESULTS = ROOT / "benchmarks" / "results" / "sst2-minilm.json"
# LoRA rows train rank-8 adapters on every linear layer (and the head) at a LoRA-sized learning rate.
LORA = ["--peft", "lora", "--lora-rank", "8", "--lr", "1e-3"]
ROWS = {
    "full": ["--method", "full"],
    "fusion": ["--method", "fusion"],
    "fusion+distill": ["--method", "fusion", "--distill-epochs", "1"],
    "fusion+calibration": ["--method", "fusion", "--calibrate"],
    "fusion+calibration+budget": ["--method", "fusion", "--calibrate", "--budget", "0.25"],
    "fold": ["--method", "fold"],
    "cluster": ["--method", "cluster"],
    "prune": ["--method", "prune"],
    "sketch": ["--method", "sketch"],
    "svd": ["--method", "svd"],
    "full+lora": ["--method", "full", *LORA],
    "fusion+lora": ["--method", "fusion", *LORA],
    "fusion+calibration+lora": ["--method", "fusion", "--calibrate", *LORA],
}
FUSED = ["--layers", "2-5", "--ratio", "0.25"]


def run_finetune(arguments: list[str], label: str) -> dict:
    """``mlp-fusion finetune ARGUMENTS --json`` in a fresh process, run from the repository root (so that data
    paths relative to it work); its JSON result without this machine's paths (the model as named)."""
    result = run_cli(["finetune", *arguments], label)
    result.pop("out", None)
    return {**result, "model": arguments[0]}


def run_row(row: str, seed: int, settings: list[str], out: Path) -> dict:
    fusion = FUSED if not row.startswith("full") else []
    if "--budget" in ROWS[row]:
        fusion = [option for option in FUSED if option not in ("--ratio", "0.25")]  # the budget replaces it
    # the row's options come last, so that its own learning rate (LoRA rows) wins
    arguments = ["minilm", "--task", "sst2", "--data", str(DATA), *fusion, *settings, *ROWS[row]]
    return run_finetune([*arguments, "--seed", str(seed), "--out", str(out)], f"{row} seed {seed}")


def linear_weights() -> int:
    """Multiply-adds per token of MiniLM's encoder linear layers (the FLOP-ideal speed-up's denominator)."""
    from mlp_fusion.loading import load_model

    model = load_model("minilm").model
    return sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))


def summarise(runs: dict, rows: list[str], seeds: list[int], timing_seeds: list[int], linear: int) -> str:
    def stats(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        mean = statistics.mean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    full = [runs[f"full/{s}"] for s in timing_seeds if f"full/{s}" in runs]
    full_step = statistics.mean(r["step_seconds"] / r["train_steps"] for r in full) if full else None
    full_params = full[0]["params"] if full else None
    lines = [
        "| row | dev accuracy (%) | s / step | fine-tuning s | peak MB | parameters | trainable | speed-up over full | FLOP-ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = [runs[f"{row}/{s}"] for s in seeds if f"{row}/{s}" in runs]
        if not found:
            continue
        timed = [runs[f"{row}/{s}"] for s in timing_seeds if f"{row}/{s}" in runs]
        step = [r["step_seconds"] / r["train_steps"] for r in timed]
        total = [r["train_seconds"] + ((r.get("distill") or {}).get("seconds") or 0.0) for r in timed]
        speed_up = f"{full_step / statistics.mean(step):.2f}x" if full_step else "n/a"
        ideal = f"{linear / (linear - (full_params - found[0]['params'])):.2f}x" if full_params else "n/a"
        lines.append(
            f"| {row} | {stats([r['metrics']['accuracy'] for r in found], 100)} | {stats(step, digits=3)} "
            f"| {stats(total, digits=0)} | {stats([r['peak_memory_mb'] for r in timed], digits=0)} "
            f"| {found[0]['params']:,} | {found[0]['trainable_params']:,} | {speed_up} | {ideal} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--timing-seeds", help="seeds whose runs give the time and memory columns (default: all of --seeds)"
    )
    parser.add_argument("--train", type=int, default=2000, help="training examples (the first N)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    timing_seeds = [int(s) for s in args.timing_seeds.split(",")] if args.timing_seeds else seeds
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    settings = [
        "--max-train-samples", str(args.train), "--epochs", str(args.epochs), "--lr", str(args.lr),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
    ]  # fmt: skip
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = saved.get("runs", {}) if saved.get("settings") == settings else {}
    results = {
        **run_header(),
        "settings": settings,
        "runs": runs,
    }
    for seed in seeds:
        for row in rows:
            key = f"{row}/{seed}"
            if key in runs:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                runs[key] = run_row(row, seed, settings, Path(tmp) / "run")
            print(
                f"{key}: accuracy {runs[key]['metrics']['accuracy']:.4f}, {runs[key]['train_seconds']:.0f} s",
                flush=True,
            )
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    intro = (
        f"MiniLM-L6 fine-tuned on SST-2: the first {args.train} train examples, {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr:g} (linear decay, 6% warm-up, weight decay 0.1, AdamW betas 0.9/0.98), "
        f"max length {args.max_length}; dev accuracy of the best epoch on all 872 dev examples; seeds "
        f"{args.seeds} (mean ± std; time and memory from seeds {','.join(map(str, timing_seeds))}). Compressed rows fuse layers 2-5 at ratio 0.25 (1536 -> 384); "
        "fusion+distill adds one epoch of layer-wise task-specific tuning first (its time is in the "
        "fine-tuning seconds); +calibration fuses with 128 training inputs as calibration; +budget keeps the "
        "same parameter count (--budget 0.25) with widths spread over the four layers from calibrated error "
        "curves; +lora trains "
        "rank-8 LoRA adapters on every linear layer and the new head (lr 1e-3) instead of the whole model, "
        "merged exactly after training. s / step is the time inside optimisation steps; fine-tuning s is the whole "
        "Trainer run with its per-epoch evaluation and checkpoints. Peak MB: the process's resident memory "
        "during training. FLOP-ideal: encoder linear-layer multiply-adds per token, full over the row (svd "
        "counted as its factors; runs before 2026-12-02 built its full weight at each step)."
    )
    table = summarise(runs, list(ROWS), seeds, timing_seeds, linear_weights()).splitlines()
    print(publish("sst2-minilm", intro, table, results, RESULTS))


if __name__ == "__main__":
    main()

"""Fine-tuning SmolLM2-135M on WebNLG 2017: full model vs fused (and distilled) and pruned, one seed.

Mirrors the paper's decoder setting at a size this CPU allows: layers 10-29 of 30 fused at ratio 0.25 (the
first third intact), the first --train (input, reference) pairs of the WebNLG train set, one epoch, then
greedy decoding of the first --eval dev inputs, scored against all their references (BLEU, chrF, TER,
ROUGE-L). Every row runs ``mlp-fusion finetune`` in its own process.

    python benchmarks/webnlg.py                                       # about 15 minutes on 2 cores
    python benchmarks/webnlg.py --rows fusion,prune --layers 20-29 --ratio 0.5   # adds milder rows
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import in_setting_order, machine, publish  # noqa: E402
from decoder import KEEP_SHARES  # noqa: E402
from sst2 import run_finetune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("..") / "shared" / "data" / "webnlg2017" / "enriched_v1.6_flat"  # relative to ROOT
RESULTS = ROOT / "benchmarks" / "results" / "webnlg-smollm2.json"
# LoRA rows: rank-8 adapters on every linear layer but the head, at a LoRA-sized learning rate.
LORA = ["--peft", "lora", "--lora-rank", "8", "--lr", "1e-3"]
# Every row names its options and pins --recipe paper, so that the default recipe of a causal LM
# (calibration and kept neurons) adds nothing it does not name.
_ROWS = {
    "full": ["--method", "full"],
    "fusion": ["--method", "fusion"],
    "fusion (raw)": ["--method", "fusion", "--no-canonical"],
    "fusion (raw)+distill": ["--method", "fusion", "--no-canonical", "--distill-epochs", "1"],
    "fusion+calibration": ["--method", "fusion", "--calibrate"],
    "fusion+calibration+distill": ["--method", "fusion", "--calibrate", "--distill-epochs", "1"],
    "prune": ["--method", "prune"],
    **{
        f"fusion+calibration+keep {share}": [
            "--method",
            "fusion",
            "--calibrate",
            "--keep-fraction",
            str(share),
        ]
        for share in KEEP_SHARES
    },
    "prune+calibration": ["--method", "prune", "--calibrate"],
    "fold": ["--method", "fold"],
    "fold+calibration": ["--method", "fold", "--calibrate"],
    "svd": ["--method", "svd"],
    "full+lora": ["--method", "full", *LORA],
    "fusion+calibration+lora": ["--method", "fusion", "--calibrate", *LORA],
}
ROWS = {row: [*options, "--recipe", "paper"] for row, options in _ROWS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        default="full,fusion,fusion+calibration,fusion+calibration+distill,fold,prune,svd",
        help=f"comma-separated, from: {', '.join(ROWS)}",
    )
    parser.add_argument("--train", type=int, default=200, help="training pairs (the first N)")
    parser.add_argument("--eval", type=int, default=30, help="dev inputs decoded and scored (the first N)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--layers", default="10-29", help="fused layers (default: the last two thirds)")
    parser.add_argument("--ratio", default="0.25", help="kept fraction of each fused MLP")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite BENCHMARKS.md from the results file"
    )
    args = parser.parse_args()
    settings = [
        "--data", str(DATA), "--max-train-samples", str(args.train), "--max-eval-samples", str(args.eval),
        "--epochs", "1", "--lr", str(args.lr), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--max-new-tokens", str(args.max_new_tokens), "--seed", "0",
    ]  # fmt: skip
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = saved.get("runs", {}) if saved.get("settings") == settings else {}
    results = {
        "commands": sorted(
            {*saved.get("commands", [])}
            | (set() if args.report else {"python benchmarks/webnlg.py " + shlex.join(sys.argv[1:])})
        ),
        # a report-only rewrite keeps the date and machine of the runs it reports
        "date": saved["date"] if args.report else date.today().isoformat(),
        "machine": saved["machine"] if args.report else machine(),
        "settings": settings,
        "runs": runs,
    }
    rows = [] if args.report else args.rows.split(",")
    for row in rows:
        unfused = row.startswith("full")
        key = row if unfused else f"{row}, layers {args.layers} at {args.ratio}"
        if key in runs:
            continue
        fusion = ["--layers", args.layers, "--ratio", args.ratio] if not unfused else []
        with tempfile.TemporaryDirectory() as tmp:
            # the row's options come last, so that its own learning rate (LoRA rows) wins
            arguments = ["smollm2", "--task", "webnlg", *fusion, *settings, *ROWS[row], "--out", f"{tmp}/run"]
            runs[key] = run_finetune(arguments, key)
        print(f"{key}: {runs[key]['metrics']}", flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| row | BLEU | chrF | TER | ROUGE-L | s / step | fine-tuning s | peak MB | parameters | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in in_setting_order(runs, lambda key: key.partition(", layers ")[2]):
        m = r["metrics"]
        total = r["train_seconds"] + ((r.get("distill") or {}).get("seconds") or 0.0)
        lines.append(
            f"| {row} | {m['bleu']:.2f} | {m['chrf']:.2f} | {m['ter']:.2f} | {m['rouge_l']:.2f} "
            f"| {r['step_seconds'] / r['train_steps']:.2f} | {total:.0f} | {r['peak_memory_mb']:.0f} | {r['params']:,} | {r['trainable_params']:,} |"
        )
    intro = (
        f"SmolLM2-135M fine-tuned on WebNLG 2017: the first {args.train} (triples, text) pairs of the train set, "
        f"one epoch, batch {args.batch_size}, lr {args.lr:g}, max length {args.max_length}; greedy decoding "
        f"(at most {args.max_new_tokens} new tokens) of the first {args.eval} dev inputs, scored with all "
        "their references (sacrebleu BLEU / chrF / TER, ROUGE-L). Compressed rows name their fused layers (of "
        "0-29) and kept fraction; fusion is symmetry-aware (canonical) clustering, (raw) the paper's clustering "
        "of raw weights; +calibration fuses with 128 training inputs as calibration (input weighting and "
        "least-squares output refit); +keep S gives the share S of each fused width to the top-scored neurons, "
        "kept exactly, and clusters the others into the rest (--keep-fraction S); +distill adds one epoch of layer-wise task-specific tuning (its time "
        "is in the fine-tuning seconds); +lora trains rank-8 LoRA adapters on every linear layer but the head "
        "(lr 1e-3) instead of the whole model, merged exactly after training. One seed; every run of these settings kept in the results file."
    )
    print(publish("webnlg-smollm2", intro, lines, results, RESULTS))


if __name__ == "__main__":
    main()

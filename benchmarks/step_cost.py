"""What each step added to fusion costs: seconds and peak memory of ``mlp-fusion compress`` on SmolLM2-135M.

One fresh process per variant, all loaded whole (``--in-memory``, since calibration needs the model in
memory) and fusing layers 25-29 at ratio 0.25, or the same parameter budget:
- raw: the paper's clustering (``--no-canonical``);
- canonical: symmetry-aware clustering (the default);
- +calibration: the first 128 WebNLG train texts (max length 64) for input weighting and the output refit;
- +keep 0.5: half of each width kept exactly for the top-scored neurons (``--keep-fraction 0.5``);
- budget: ``--budget 0.25`` from data-free error curves, and with calibration.
Peak memory is the process's high-water mark of resident memory (VmHWM); seconds cover the whole command
(loading, fusing, writing).

    python benchmarks/step_cost.py           # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402
from decoder import webnlg_texts  # noqa: E402
from streaming import compress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "step-cost-smollm2.json"
# label -> (extra options, calibrated, widths from a budget)
VARIANTS = {
    "raw": (["--no-canonical"], False, False),
    "canonical": ([], False, False),
    "canonical+calibration": ([], True, False),
    "canonical+calibration+keep 0.5": (["--keep-fraction", "0.5"], True, False),
    "canonical, budget": ([], False, True),
    "canonical+calibration, budget": ([], True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="25-29")
    parser.add_argument("--ratio", default="0.25", help="ratio of the one-width rows (and the budget)")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite BENCHMARKS.md from the results file"
    )
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    results = {**run_header(), "layers": args.layers, "ratio": args.ratio, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "calibration.txt"
        texts.write_text("\n".join(webnlg_texts("train", 0, 128)) + "\n")
        calibration = ["--calibration", str(texts), "--max-length", "64"]
        for label, (extra, calibrated, budget) in VARIANTS.items():
            size = ["--budget" if budget else "--ratio", args.ratio]
            options = ["--layers", args.layers, *size, *extra, *(calibration if calibrated else [])]
            row = compress("smollm2", Path(tmp) / label.replace(" ", "_"), options, True)
            results["rows"][label] = row
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # a stopped run keeps its rows
            print(label, row, file=sys.stderr, flush=True)
    print(report(results))


def report(results: dict) -> str:
    """The results as a Markdown table with their provenance, written into BENCHMARKS.md."""
    rows = results["rows"]
    base = rows["raw"]
    lines = ["| variant | seconds | x raw | peak resident MB | + MB over raw |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} | {r['peak_mb']:.0f} "
        f"| {r['peak_mb'] - base['peak_mb']:+.0f} |"
        for name, r in rows.items()
    ]
    intro = (
        f"`mlp-fusion compress smollm2 --in-memory --layers {results['layers']}` at ratio {results['ratio']} "
        f"(or `--budget {results['ratio']}`), one fresh process per variant; seconds for the whole command, "
        "peak memory the process's VmHWM."
    )
    return publish("step-cost-smollm2", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

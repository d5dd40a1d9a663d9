"""Per-expert fusion on a real-weights MoE: SmolLM2-135M upcycled to 4 experts (top 2), vs prune.

The MoE starts as copies of the dense MLP with zero routers (its outputs equal the dense model's). Layers
25-29 are compressed at ratio 0.25 per expert; ``mlp-fusion ntk`` reports the output error and the
Adam-kernel error (per-example gradients of log p(last token) over the fused experts' tensors) against
the uncompressed MoE on 8 built-in probe sentences. The dense model is measured the same way.

    python benchmarks/upcycled_moe.py        # about 10 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "upcycled-moe-smollm2.json"
NTK = ["--methods", "fusion,prune", "--ratios", "0.25", "--layers", "25-29", "--probes", "8"]
NTK += ["--params", "fused", "--kernels", "adam", "--json"]


def cli(*arguments: str) -> str:
    command = [sys.executable, "-c", "import sys; from mlp_fusion.cli import main; sys.exit(main())"]
    done = subprocess.run([*command, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mlp-fusion {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cli("upcycle", "smollm2", "--experts", "4", "--top-k", "2", "--out", f"{tmp}/moe")
        moe = json.loads(cli("ntk", f"{tmp}/moe", *NTK))
    dense = json.loads(cli("ntk", "smollm2", *NTK))
    results = {
        **run_header(),
        "moe": moe["rows"],
        "dense": dense["rows"],
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    lines = [
        "| model | method | output error | Adam-kernel error | Adam alignment |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("upcycled MoE, per expert", results["moe"]), ("dense SmolLM2", results["dense"])):
        for row in rows:
            lines.append(
                f"| {name} | {row['method']} | {row['output_error']:.3f} | {row['adam_error']:.3f} "
                f"| {row['adam_alignment']:.3f} |"
            )
    intro = (
        "SmolLM2-135M upcycled to a Mixtral-style MoE (4 experts, top 2, experts copied from the dense MLP, "
        "zero routers), layers 25-29 compressed per expert at ratio 0.25 (1536 -> 384), against the "
        "uncompressed model; the dense model the same way. 8 built-in probe sentences, one seed; kernels over "
        "the compressed MLPs' tensors."
    )
    return publish("upcycled-moe", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

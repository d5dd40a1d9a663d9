"""Working memory of fusing one large gated MLP: the README's formula against the measured peak.

A TinyLlama-sized gated MLP (width 5632, hidden 2048, random float32 weights) is fused at ratio 0.25 by the
``fusion`` method (canonical form, k-means with Hartigan refinement) in a fresh process; memory is the
process's high-water mark of resident memory (VmHWM) after the sub-MLPs are built and after fusion.

    python benchmarks/fusion_memory.py        # about 4 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fusion-memory.json"
WIDTH, HIDDEN = 5632, 2048
MEASURED = f"""
import json, re, time, torch
from mlp_fusion.config import FusionConfig
from mlp_fusion.methods import METHODS
from mlp_fusion.methods.base import SubMlps

def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

g = torch.Generator().manual_seed(0)
rows = [torch.randn(1, {WIDTH}, {HIDDEN}, generator=g) * 0.02 for _ in range(3)]
sub = SubMlps(rows[:2], rows[2], (False, False), symmetry="gated")
before = peak_mb()
start = time.perf_counter()
METHODS["fusion"](sub, {WIDTH // 4}, FusionConfig(ratio=0.25))
print(json.dumps({{"before_mb": before, "after_mb": peak_mb(), "seconds": time.perf_counter() - start}}))
"""


def main() -> None:
    done = subprocess.run([sys.executable, "-c", MEASURED], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    p, k = 3 * HIDDEN, WIDTH // 4
    formula_mb = (WIDTH * p * 4 * 6 + WIDTH * k * 4 * 3) / 2**20
    results = {
        **run_header(),
        "measured": measured,
        "formula_mb": formula_mb,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    measured, formula_mb, p = results["measured"], results["formula_mb"], 3 * HIDDEN
    intro = (
        f"Fusing one gated MLP of width {WIDTH} and hidden size {HIDDEN} (random float32 weights) at ratio "
        f"0.25 in a fresh process: the peak resident memory (VmHWM) rose from {measured['before_mb']:.0f} MB "
        f"(interpreter, torch and the float32 sub-MLPs of {WIDTH * p * 4 / 2**20:.0f} MB) to "
        f"{measured['after_mb']:.0f} MB, i.e. {measured['after_mb'] - measured['before_mb']:.0f} MB of working "
        f"memory, in {measured['seconds']:.0f} s. The README's formula (`D * p * 4 bytes * 6 + D * k * 4 bytes "
        f"* 3`, which counts the sub-MLPs themselves) gives {formula_mb:.0f} MB."
    )
    return publish("fusion-memory", intro, [], results, RESULTS)


if __name__ == "__main__":
    main()

"""Peak memory and time of exporting a fused checkpoint: ``mlp-fusion export`` (a tensor at a time) against
``mlp_fusion.export`` on the loaded model (in memory), each in a fresh process.

The checkpoint: the synthetic TinyLlama-shaped bfloat16 LLaMA of benchmarks/streaming.py (random weights,
about 2.2 GB), with every layer fused at 0.25 by ``mlp-fusion compress`` (export needs one width per config
field). Both exports must hold the same tensors; the script loads them with transformers and compares.

    python benchmarks/export.py              # about 15 minutes on 2 cores (fusing 22 layers dominates)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, write_results  # noqa: E402
from streaming import CLI, MEASURED, size_gb, write_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "export.json"
IN_MEMORY = """
import json, re, sys, time
import mlp_fusion
start = time.perf_counter()
mlp_fusion.export(mlp_fusion.from_pretrained(sys.argv[1]), sys.argv[2])
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"code": 0, "seconds": time.perf_counter() - start, "peak_mb": peak / 1024}))
"""


def measured(program: str, *arguments: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", program, *arguments], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"{arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_tensors(left: Path, right: Path) -> bool:
    import transformers

    a = transformers.AutoModelForCausalLM.from_pretrained(left).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(right).state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-layers", type=int, default=22, help="layers of the synthetic LLaMA")
    parser.add_argument(
        "--width", type=int, default=64, help="fused width of every MLP (small: k-means is fast)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        write_llama(tmp / "llama", args.llama_layers)
        fuse = ["compress", str(tmp / "llama"), "--width", str(args.width), "--out", str(tmp / "fused")]
        subprocess.run([sys.executable, "-c", CLI, *fuse], check=True, capture_output=True, cwd=ROOT)
        rows = {
            "streaming (mlp-fusion export)": measured(
                MEASURED, "export", str(tmp / "fused"), "--out", str(tmp / "a")
            ),
            "in memory (mlp_fusion.export)": measured(IN_MEMORY, str(tmp / "fused"), str(tmp / "b")),
        }
        fused_gb, out_gb = size_gb(tmp / "fused"), size_gb(tmp / "a")
        equal = same_tensors(tmp / "a", tmp / "b")
    results = write_results(
        RESULTS, {"fused_gb": fused_gb, "output_gb": out_gb, "same_tensors": equal, "rows": rows}
    )
    lines = ["| export | peak resident MB | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |" for name, r in rows.items()]
    intro = (
        f"Exporting a fused checkpoint of {fused_gb:.2f} GB (the synthetic TinyLlama-shaped bfloat16 LLaMA of "
        f"`benchmarks/streaming.py`, every MLP fused to width {args.width}) into a plain checkpoint of "
        f"{out_gb:.2f} GB, each way in a fresh process; peak memory is the process's VmHWM. Same tensors "
        f"(both exports loaded with transformers and compared): {equal}."
    )
    print(publish("export", intro, lines, results, RESULTS))


if __name__ == "__main__":
    main()

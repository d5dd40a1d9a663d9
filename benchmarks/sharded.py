"""Fine-tuning a fused SmolLM2 sharded across two processes (``finetune --fsdp``) against one process.

SmolLM2-135M fused at layers 10-29, ratio 0.25 (data-free, ``--recipe paper``, so both runs start from the
same model without calibration work), fine-tuned on the first --train WebNLG pairs for one epoch with a
global batch of 8: one process with batch 8, then ``torchrun --nproc_per_node 2 ... --fsdp`` with batch 4
per process, from the base model and from the same model saved fused by ``compress`` (read shard-wise).
Compared: every step's training loss, each process's peak resident memory (during training and over its
whole life), and the saved checkpoints' logits on a few dev inputs (reloaded with ``from_pretrained``).

    python benchmarks/sharded.py             # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, write_results  # noqa: E402
from webnlg import DATA  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sharded-smollm2.json"
CLI = "import sys; from mlp_fusion.cli import main; sys.exit(main())"


def run(processes: int, batch: int, out: Path, train: int, model: str = "smollm2") -> dict:
    """One ``finetune`` of ``model`` (the base model is fused at 10-29 / 0.25 first; a fused checkpoint is
    trained as it is)."""
    fusion = ["--layers", "10-29", "--ratio", "0.25", "--recipe", "paper"] if model == "smollm2" else []
    arguments = [
        "finetune", model, "--task", "webnlg", "--data", str(DATA), *fusion,
        "--max-train-samples", str(train), "--max-eval-samples", "8", "--epochs", "1",
        "--batch-size", str(batch), "--lr", "1e-4", "--max-length", "64", "--max-new-tokens", "16",
        "--out", str(out), "--json",
    ]  # fmt: skip
    if processes > 1:
        script = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command = [*script, "--master_port", "29541", str(Path(sys.executable).parent / "mlp-fusion")]
        command += [*arguments, "--fsdp"]
    else:
        command = [sys.executable, "-c", CLI, *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    result.pop("out", None)
    return {**result, "model": "smollm2"}  # as named, not this machine's path to it


def compressed(out: Path) -> Path:
    """SmolLM2 fused as the runs fuse it (same layers, ratio, recipe and seed), saved by ``compress``."""
    command = [sys.executable, "-c", CLI, "compress", "smollm2", "--layers", "10-29", "--ratio", "0.25"]
    done = subprocess.run([*command, "--recipe", "paper", "--out", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compress failed:\n{done.stderr[-3000:]}")
    return out


def logits(directory: Path) -> torch.Tensor:
    import mlp_fusion
    from mlp_fusion.loading import load_tokenizer

    model = mlp_fusion.from_pretrained(directory).eval()
    tokenizer = load_tokenizer(directory)
    batch = tokenizer(["Aarhus Airport | cityServed | Aarhus", "Alan Bean | occupation | Test pilot"],
                      return_tensors="pt", padding=True)  # fmt: skip
    with torch.no_grad():
        return model(**batch).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="training pairs (steps: this / 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        runs = {"one process, batch 8": run(1, 8, Path(tmp) / "one", args.train)}
        runs["two processes --fsdp, batch 4 each"] = run(2, 4, Path(tmp) / "two", args.train)
        fused = str(compressed(Path(tmp) / "fused"))
        runs["two processes --fsdp from the fused checkpoint"] = run(
            2, 4, Path(tmp) / "three", args.train, fused
        )
        for label, r in runs.items():
            print(label, r["losses"], r["peak_memory_mb_per_process"], flush=True)
        reference = logits(Path(tmp) / "one")
        logit_difference = max(
            float((reference - logits(Path(tmp) / name)).abs().max()) for name in ("two", "three")
        )
    one = runs["one process, batch 8"]
    difference = max(abs(x - y) for r in runs.values() for x, y in zip(one["losses"], r["losses"]))
    results = write_results(
        RESULTS, {"runs": runs, "max_loss_difference": difference, "max_logit_difference": logit_difference}
    )
    table = [
        "| run | steps | peak resident MB per process, training | whole process, loading included | first loss | last loss |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        peaks = " / ".join(f"{mb:.0f}" for mb in r["peak_memory_mb_per_process"])
        lifetime = " / ".join(f"{mb:.0f}" for mb in r["process_peak_mb_per_process"])
        table.append(
            f"| {label} | {len(r['losses'])} | {peaks} | {lifetime} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
        )
    intro = (
        "SmolLM2-135M fused at layers 10-29, ratio 0.25 (`--recipe paper`), fine-tuned on the first "
        f"{args.train} WebNLG pairs for one epoch, global batch 8, float32: one process, then two processes "
        "with `finetune --fsdp` under torchrun (gloo), from the base model (each process loads and fuses "
        "it whole, then shards it) and from the same model saved fused by `compress` (each process reads "
        "only its own rows of every tensor). Peak memory: each process's resident high-water mark over "
        "training, and over its whole life. Largest step-by-step loss difference to one process: "
        f"{difference:.2e}; largest logit difference of a sharded run's saved checkpoint to the one-process "
        "one (reloaded with "
        f"`from_pretrained`, two dev inputs): {logit_difference:.2e}."
    )
    print(publish("sharded-smollm2", intro, table, results, RESULTS))


if __name__ == "__main__":
    main()

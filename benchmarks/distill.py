"""Layer-wise task-specific tuning on MiniLM: hidden-state error of the fused model before and after.

MiniLM-L6, layers 2-5 fused at ratio 0.25; distillation on the first 512 SST-2 train sentences (batches of
32, one epoch, Adam lr 1e-4); the baseline is the same fused model before distillation, measured in the same
run on the first 128 SST-2 dev sentences (held out).

    python benchmarks/distill.py             # about 2 minutes on 2 cores
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

from mlp_fusion import FusionConfig, distill, fuse  # noqa: E402
from mlp_fusion.batches import micro_batches, probe_batch, read_probe_texts  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402
from mlp_fusion.training.distill import hidden_state_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "benchmarks" / "results" / "distill-minilm.json"
TRAIN, DEV, BATCH, LR = 512, 128, 32, 1e-4


def main() -> None:
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    loaded = load_model("minilm")
    original, tokenizer = loaded.model, loaded.tokenizer
    fused = copy.deepcopy(original)
    fuse(fused, FusionConfig(ratio=0.25, layers="2-5", seed=0))

    def batches(path: Path, count: int) -> list[dict]:
        texts = read_probe_texts(path, count)
        return micro_batches(probe_batch(original, tokenizer, count=len(texts), texts=texts), BATCH)

    train, dev = batches(DATA / "train.tsv", TRAIN), batches(DATA / "dev.tsv", DEV)
    dev_before = hidden_state_error(original, fused, dev)
    start = time.perf_counter()
    train_errors = distill(original, fused, train, epochs=1, lr=LR)
    seconds = time.perf_counter() - start
    dev_after = hidden_state_error(original, fused, dev)
    results = {
        **run_header(),
        "train": train_errors,
        "dev": {"before": dev_before, "after": dev_after},
        "seconds": seconds,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    train_errors, dev = results["train"], results["dev"]
    intro = (
        f"MiniLM-L6, layers 2-5 fused at ratio 0.25, distilled on the first {TRAIN} SST-2 train sentences "
        f"(batches of {BATCH}, one epoch, Adam lr {LR:g}). Mean per-token squared hidden-state distance to the "
        f"unfused model, averaged over layers (distillation took {results['seconds']:.0f} s):"
    )
    table = [
        "| inputs | fused, before distillation | after |",
        "|---|---|---|",
        f"| {TRAIN} train sentences | {train_errors['before']:.2f} | {train_errors['after']:.2f} |",
        f"| {DEV} dev sentences (held out) | {dev['before']:.2f} | {dev['after']:.2f} |",
    ]
    return publish("distill-minilm", intro, table, results, RESULTS)


if __name__ == "__main__":
    main()

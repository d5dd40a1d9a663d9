"""An independent plain PyTorch fine-tuning loop, to cross-check ``mlp-fusion finetune --method full``.

It uses none of mlp-fusion's training code: its own TSV reading, batching, AdamW with the same settings
(betas 0.9/0.98, eps 1e-6, weight decay 0.1 off biases and norms), linear decay after 6% warm-up, an
evaluation on all 872 SST-2 dev examples after each epoch, the best epoch reported. Same data subset and
hyper-parameters as ``benchmarks/sst2.py``; its full rows are the comparison.

    python benchmarks/plain_finetune.py --seeds 0,1,2     # about 3 minutes per seed on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

from mlp_fusion.loading import bundled_path  # noqa: E402  (only to find the bundled MiniLM's files)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2"
SST2_RESULTS = ROOT / "benchmarks" / "results" / "sst2-minilm.json"
RESULTS = ROOT / "benchmarks" / "results" / "plain-finetune-minilm.json"


def read(path: Path, limit: int | None = None) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8") as handle:
        rows = [
            (r["sentence"], int(r["label"]))
            for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    return rows[:limit] if limit else rows


def batches(rows, tokenizer, size: int, max_length: int, generator: torch.Generator | None = None):
    order = (
        torch.randperm(len(rows), generator=generator).tolist() if generator is not None else range(len(rows))
    )
    order = list(order)
    for start in range(0, len(order), size):
        chosen = [rows[i] for i in order[start : start + size]]
        encoded = tokenizer(
            [t for t, _ in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield encoded, torch.tensor([label for _, label in chosen])


def accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for encoded, labels in batches(rows, tokenizer, 64, max_length):
            correct += int((model(**encoded).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(rows)


def run(seed: int, args) -> dict:
    path = bundled_path("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    transformers.set_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, dev = read(DATA / "train.tsv", args.train), read(DATA / "dev.tsv")
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps = args.epochs * -(-len(train) // args.batch_size)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * steps + 0.999), steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    scores, start = [], time.perf_counter()
    for _ in range(args.epochs):
        for encoded, labels in batches(train, tokenizer, args.batch_size, args.max_length, generator):
            loss = torch.nn.functional.cross_entropy(model(**encoded).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        scores.append(accuracy(model, dev, tokenizer, args.max_length))
    return {
        "seed": seed,
        "epoch_accuracy": scores,
        "best": max(scores),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    runs = [run(int(s), args) for s in args.seeds.split(",")]
    settings = {name: getattr(args, name) for name in ("train", "epochs", "lr", "batch_size", "max_length")}
    results = {**run_header(), "settings": settings, "runs": runs}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    runs, settings = results["runs"], results["settings"]
    ours = json.loads(SST2_RESULTS.read_text())["runs"] if SST2_RESULTS.exists() else {}
    lines = [
        "| seed | plain loop: dev accuracy (%) | `mlp-fusion finetune --method full` (benchmarks/sst2.py) |",
        "|---|---|---|",
    ]
    for r in runs:
        mine = ours.get(f"full/{r['seed']}")
        theirs = f"{100 * mine['metrics']['accuracy']:.2f}" if mine else "not run"
        lines.append(f"| {r['seed']} | {100 * r['best']:.2f} | {theirs} |")
    lines.append(f"| mean | {statistics.mean(100 * r['best'] for r in runs):.2f} | |")
    intro = (
        f"Cross-check of the fine-tuning path: MiniLM-L6 unfused, the first {settings['train']} SST-2 train "
        f"examples, {settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']:g}, max length "
        f"{settings['max_length']}, best-epoch dev accuracy on all 872 dev examples, from an independent plain "
        "PyTorch loop (`benchmarks/plain_finetune.py`) and from `mlp-fusion finetune`. The two shuffle the data "
        "differently, so they agree only up to seed noise."
    )
    return publish("plain-finetune", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

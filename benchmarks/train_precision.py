"""Training step time in float32 and in bfloat16 autocast (``finetune --precision bfloat16``), the same
models taking turns in one process.

SmolLM2-135M as a causal LM, whole and fused at layers 10-29 / 0.25 (data-free, as ``train_step.py`` builds
them), batches of 8 x 64 random tokens (the WebNLG setting). A step is forward, loss, backward, AdamW step
and zero_grad, in training mode; with bfloat16 the forward pass and its backward run under
``torch.autocast`` (the weights, gradients and AdamW's state stay float32), as the ``Trainer`` does with
``bf16=True``. After two warm-up steps per run, the four runs take turns for --rounds rounds of --steps
steps; the table gives each run's median round and the speed-up of bfloat16 over float32 from the medians.

    python benchmarks/train_precision.py          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402
from train_step import CASES, LENGTH, batch_for, build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train-precision.json"
CASE = "SmolLM2-135M, causal LM"
PRECISIONS = ("float32", "bfloat16")


def stepper(model: torch.nn.Module, batch: dict, precision: str):
    """One optimisation step of ``model`` on ``batch`` with its own AdamW, the products in ``precision``."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--report", action="store_true", help="only rewrite BENCHMARKS.md from the results file"
    )
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    alias, head, layers, batch_size = CASES[CASE]
    models = {name: model for name, model in build(alias, head, layers).items() if name != "plain twin"}
    steps = {
        (name, precision): stepper(model, batch_for(model, batch_size), precision)
        for name, model in models.items()
        for precision in PRECISIONS
    }
    for step in steps.values():
        step(), step()  # warm-up: allocator, optimiser state
    timings: dict[tuple, list[float]] = {key: [] for key in steps}
    for number in range(args.rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            timings[key].append((time.perf_counter() - start) / args.steps)
        print(number, {" ".join(key): f"{values[-1]:.2f}" for key, values in timings.items()}, flush=True)
    rows = [
        {"model": name, "precision": precision, "seconds": statistics.median(timings[name, precision]),
         "every_round": timings[name, precision]}
        for name, precision in steps
    ]  # fmt: skip
    results = {**run_header(), "case": CASE, "layers": layers, "batch": [batch_size, LENGTH],
               "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows}  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    """The results as a Markdown table with its provenance, written into BENCHMARKS.md."""
    seconds = {(r["model"], r["precision"]): r["seconds"] for r in results["rows"]}
    lines = ["| model | s / step, float32 | s / step, bfloat16 | speed-up |", "|---|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in results["rows"]):
        full, half = seconds[model, "float32"], seconds[model, "bfloat16"]
        lines.append(f"| {model} | {full:.2f} | {half:.2f} | {full / half:.2f}x |")
    spread = max(max(r["every_round"]) / min(r["every_round"]) for r in results["rows"])
    intro = (
        f"{results['case']}, whole and fused at layers {results['layers']} / 0.25, one optimisation step on "
        f"{results['batch'][0]} x {results['batch'][1]} random tokens, float32 against bfloat16 autocast (the "
        f"weights and AdamW's state float32); the four runs take turns, {results['rounds']} rounds of "
        f"{results['steps_per_round']} steps, nothing else running; each run's median round (one run's rounds "
        f"differed by up to {100 * (spread - 1):.0f}%)."
    )
    return publish("train-precision", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

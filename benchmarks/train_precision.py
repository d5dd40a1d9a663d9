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

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402
from train_step import CASES, LENGTH, batch_for, build, stepper, time_turns, timing_options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train-precision.json"
CASE = "SmolLM2-135M, causal LM"
PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    args = timing_options(__doc__, rounds=5, steps=2)
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    alias, head, layers, batch_size = CASES[CASE]
    models = {name: model for name, model in build(alias, head, layers).items() if name != "plain twin"}
    steppers = {
        (name, precision): stepper(model, batch_for(model, batch_size), precision)
        for name, model in models.items()
        for precision in PRECISIONS
    }
    timings = time_turns(steppers, args.rounds, args.steps)
    rows = [
        {"model": name, "precision": precision, "seconds": statistics.median(timings[name, precision]),
         "every_round": timings[name, precision]}
        for name, precision in steppers
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

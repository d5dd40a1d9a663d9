"""Optimisation step time: full model, fused model and the fused model's plain twin, against the FLOP-ideal.

Two cases, each with the three models in one process:
- MiniLM-L6 with a new 2-class head, layers 2-5 fused at 0.25, batches of 32 x 64 tokens (the SST-2 setting);
- SmolLM2-135M as a causal LM, layers 10-29 fused at 0.25, batches of 8 x 64 tokens (the WebNLG setting).
A step is forward, loss, backward, AdamW step and zero_grad on one fixed batch of random tokens, in
training mode. After two warm-up steps per model, the models take turns for --rounds rounds of --steps
steps each (the machine's speed drifts within a run; turns keep that out of the comparison); the table
gives each model's median round. FLOP-ideal: the full model's linear-layer multiply-adds per token over
the fused model's (every Linear / Conv1D, the language-model head included); the plain twin
(``exporting.folded_copy``: the scales folded into the weights) has the fused model's widths without the
scale, so fused against twin is what the fixed scale costs.

    python benchmarks/train_step.py          # about 10 minutes on 2 cores
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train-step.json"
CASES = {
    "MiniLM-L6, 2-class head": ("minilm", "AutoModelForSequenceClassification", "2-5", 32),
    "SmolLM2-135M, causal LM": ("smollm2", "AutoModelForCausalLM", "10-29", 8),
}
LENGTH = 64


def linear_macs(model: torch.nn.Module) -> int:
    """Multiply-adds per token of every Linear / Conv1D (a tied head counted once per use, as computed)."""
    from transformers.pytorch_utils import Conv1D

    from mlp_fusion.sites import weight_shape

    return sum(
        weight_shape(m, "weight").numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))
    )


def build(alias: str, head: str, layers: str) -> dict[str, torch.nn.Module]:
    import transformers

    import mlp_fusion
    from mlp_fusion.loading import bundled_path
    from mlp_fusion.plain_export import folded_copy

    model_class = getattr(transformers, head)
    options = {"num_labels": 2} if "Sequence" in head else {}

    def load(path) -> torch.nn.Module:
        torch.manual_seed(0)  # the same new head everywhere
        return model_class.from_pretrained(path, dtype=torch.float32, **options)

    full, fused = load(bundled_path(alias)), load(bundled_path(alias))
    mlp_fusion.fuse(fused, mlp_fusion.FusionConfig(ratio=0.25, layers=layers))
    return {"full": full, "fused": fused, "plain twin": folded_copy(fused)}


def batch_for(model: torch.nn.Module, size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (size, LENGTH), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "Sequence" in type(model).__name__:
        return {**batch, "labels": torch.randint(2, (size,), generator=generator)}
    return {**batch, "labels": ids}


def stepper(model: torch.nn.Module, batch: dict, precision: str = "float32"):
    """One optimisation step of ``model`` on ``batch`` with its own AdamW; with ``precision`` bfloat16 the
    forward pass (and so its backward) runs under autocast, as the Trainer's ``bf16=True`` does."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_turns(steppers: dict, rounds: int, steps: int) -> dict:
    """Seconds per step of each named stepper over ``rounds`` rounds of ``steps`` steps, taking turns
    after two warm-up steps each."""
    for step in steppers.values():
        step(), step()  # warm-up: allocator, optimiser state
    timings: dict = {name: [] for name in steppers}
    for number in range(rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            timings[name].append((time.perf_counter() - start) / steps)
        print(number, {str(name): f"{values[-1]:.3f}" for name, values in timings.items()}, flush=True)
    return timings


def time_case(models: dict, batch_size: int, rounds: int, steps: int) -> dict[str, list[float]]:
    steppers = {name: stepper(model, batch_for(model, batch_size)) for name, model in models.items()}
    return time_turns(steppers, rounds, steps)


def timing_options(doc: str, rounds: int, steps: int) -> argparse.Namespace:
    """A step-timing benchmark's options: how many rounds of how many steps, or ``--report`` alone."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument(
        "--report", action="store_true", help="only rewrite BENCHMARKS.md from the results file"
    )
    return parser.parse_args()


def main() -> None:
    args = timing_options(__doc__, rounds=9, steps=3)
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    rows = []
    for label, (alias, head, layers, batch_size) in CASES.items():
        models = build(alias, head, layers)
        macs = {name: linear_macs(model) for name, model in models.items()}
        timings = time_case(models, batch_size, args.rounds, args.steps)
        median = {name: statistics.median(values) for name, values in timings.items()}
        best = {name: min(values) for name, values in timings.items()}
        ideal = macs["full"] / macs["fused"]
        rows.append({
            "case": label, "layers": layers, "batch": [batch_size, LENGTH], "seconds": median,
            "best_seconds": best, "every_round": timings, "linear_macs": macs, "flop_ideal": ideal,
            "speed_up": median["full"] / median["fused"], "best_speed_up": best["full"] / best["fused"],
            "twin_speed_up": median["full"] / median["plain twin"],
            "best_twin_speed_up": best["full"] / best["plain twin"],
        })  # fmt: skip
        del models
    results = {
        **run_header(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    """The results as a Markdown table with its provenance, written into BENCHMARKS.md."""
    lines = [
        "| case | fused layers | s / step: full | fused | plain twin | speed-up: fused | plain twin | FLOP-ideal | fused / FLOP-ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        s = r["seconds"]
        lines.append(
            f"| {r['case']} | {r['layers']} at 0.25 | {s['full']:.3f} | {s['fused']:.3f} | {s['plain twin']:.3f} "
            f"| {r['speed_up']:.2f}x ({r['best_speed_up']:.2f}x) | {r['twin_speed_up']:.2f}x ({r['best_twin_speed_up']:.2f}x) "
            f"| {r['flop_ideal']:.2f}x | {100 * r['speed_up'] / r['flop_ideal']:.0f}% ({100 * r['best_speed_up'] / r['flop_ideal']:.0f}%) |"
        )
    spread = max(max(v) / min(v) for r in results["rows"] for v in r["every_round"].values())
    intro = (
        "One optimisation step (forward, loss, backward, AdamW step) on a fixed batch of random tokens, "
        f"float32 on the CPU; the models take turns, {results['rounds']} rounds of {results['steps_per_round']} "
        "steps; times are each model's median round, speed-ups from the medians and, in brackets, from each "
        f"model's fastest round (one model's rounds differed by up to {100 * (spread - 1):.0f}% in this run). "
        "FLOP-ideal: linear-layer multiply-adds per token, full over fused; the last column is the fused "
        "speed-up over the FLOP-ideal one."
    )
    return publish("train-step", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

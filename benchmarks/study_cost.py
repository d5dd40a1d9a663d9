"""The study's costs beside its quality, measured with nothing else running and the rows taking turns for
ROUNDS rounds (the machine's speed drifts, so one row after another would favour some):

- training: a short `mlp-fusion finetune` of the row's model as its test runs start (compressed with seed
  0), COST_PAIRS pairs at the study's settings and the row's chosen rate: seconds per step, peak memory,
  trainable parameters;
- decoding: the row's fine-tuned test model of seed 0 (LoRA merged) decoding PROMPTS greedily at batch 1,
  exactly TOKENS new tokens each after a warm-up: tokens per second.

Each measurement is saved as it ends and a rerun skips it. Needs the test runs of seed 0.

    python benchmarks/study_cost.py                 # every row with a test run of seed 0
    python benchmarks/study_cost.py --rows full,lora,S1-default
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import run_cli, run_header  # noqa: E402
from inference import PROMPTS, decode_seconds  # noqa: E402
from study import (  # noqa: E402
    DECODING,
    MODEL,
    ROOT,
    ROWS,
    STUDY,
    TRAINING,
    WORK,
    Row,
    choices,
    compressed,
    data_options,
    run_folder,
)

COST = STUDY / MODEL / "cost.json"
ROUNDS, COST_PAIRS, TOKENS = 3, 80, 48


def training_cost(row: Row, rate: str) -> dict:
    """Seconds per step, peak memory and parameters of a short fine-tuning run of the row."""
    model, _ = compressed(row, 0)
    command = [
        "finetune", model, *data_options("validation", 0, pairs=COST_PAIRS, inputs=1), *TRAINING, *DECODING,
        "--seed", "0", *row.finetune, "--lr", rate, "--out", str(WORK / "runs" / "cost" / row.name), "--overwrite",
    ]  # fmt: skip
    result = run_cli(command, f"cost of {row.name}")
    return {
        "seconds_per_step": result["step_seconds"] / result["train_steps"],
        "peak_memory_mb": result["peak_memory_mb"],
        "trainable_params": result["trainable_params"],
        "params": result["params"],
    }


def decoding_speed(row: Row, rate: str) -> float:
    """Greedy tokens per second of the row's fine-tuned test model of seed 0, batch 1."""
    from mlp_fusion.loading import load_model

    loaded = load_model(str(ROOT / run_folder(row, rate, 0, "test")))
    decode_seconds(loaded.model, loaded.tokenizer, PROMPTS[0], TOKENS)  # warm-up
    seconds = sum(decode_seconds(loaded.model, loaded.tokenizer, prompt, TOKENS) for prompt in PROMPTS)
    return len(PROMPTS) * TOKENS / seconds


def measure(rows: list[Row]) -> None:
    chosen = choices()
    record = json.loads(COST.read_text()) if COST.is_file() else {**run_header(), "rounds": {}}
    for number in range(ROUNDS):
        done = record["rounds"].setdefault(str(number), {})
        for row in rows:
            if row.name in done:
                continue
            print(f"cost: round {number}, {row.name}", file=sys.stderr, flush=True)
            rate = chosen[row.name]
            done[row.name] = {**training_cost(row, rate), "tokens_per_second": decoding_speed(row, rate)}
            COST.write_text(json.dumps(record, indent=2) + "\n")


def costs() -> dict[str, dict]:
    """Each measured row's costs: the per-round values, and the median of each over the rounds."""
    rounds = json.loads(COST.read_text())["rounds"] if COST.is_file() else {}
    found: dict[str, dict] = {}
    for measured in rounds.values():
        for row, values in measured.items():
            for key, value in values.items():
                found.setdefault(row, {}).setdefault(key, []).append(value)
    return {
        row: {**{key: statistics.median(values) for key, values in found[row].items()}, "rounds": found[row]}
        for row in found
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default=None, help="comma-separated; default every row with a seed-0 test run"
    )
    args = parser.parse_args()
    names = (
        args.rows.split(",")
        if args.rows
        else [n for n in ROWS if (STUDY / MODEL / n / "seed0.jsonl").is_file()]
    )
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    measure([ROWS[name] for name in names])
    print(
        json.dumps(
            {row: {k: v for k, v in c.items() if k != "rounds"} for row, c in costs().items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()

"""Healing after compression: held-out perplexity against healing steps and CPU minutes.

Each row compresses a model as `mlp-fusion compress` does (the default recipe, or calibrated pruning on the
same sampled calibration texts) at the S1 or S2 shape, then heals it toward the original on texts sampled
from the original (one sampling seed per run), and measures perplexity at 0 and after each of STEPS
healing steps on three held-out domains that no choice was made on and that never heal: WebNLG 2017 test
texts, E2E test references and SST-2 test sentences (from ../shared/data; 200 of each drawn at random,
`benchmarks/_held_out.py`), reported separately. Rows are
saved as they finish, and a rerun skips them.

    python benchmarks/heal.py --models smollm2 --settings S1 --seeds 0     # one row first
    python benchmarks/heal.py                                               # every row (hours)
    python benchmarks/heal.py --step-cost        # seconds per healing step and peak memory, SmolLM2 at S1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import DATA, domains, measure  # noqa: E402
from _report import ROOT, publish, run_header  # noqa: E402

from mlp_fusion import compress, recipes  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402
from mlp_fusion.training.heal import HealSettings, heal  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "heal.json"
SETTINGS = {
    "smollm2": {"S1": ("20-29", 0.5), "S2": ("10-29", 0.25)},
    "gemma3": {"S1": ("12-17", 0.5), "S2": ("6-17", 0.25)},
}
ROWS = {"default": {}, "prune": {"method": "prune"}}  # compress options beyond the shape
STEPS = (100, 300, 1000)
HEALING = dict(heal_texts=1000, heal_lr=5e-5, heal_batch_size=8, heal_train="all")


def run_row(model_name: str, row: str, setting: str, seed: int, domains: dict) -> dict:
    layers, ratio = SETTINGS[model_name][setting]
    original = load_model(model_name)
    start = time.perf_counter()
    done = compress(model_name, layers=layers, ratio=ratio, **ROWS[row])
    compress_seconds = time.perf_counter() - start
    sampling = recipes.fitted_sampling(
        recipes.Sampling(count=HEALING["heal_texts"], seed=seed), original.model
    )
    start = time.perf_counter()
    texts = recipes.sample_texts(original.model, original.tokenizer, sampling)
    sampling_seconds = time.perf_counter() - start
    curve = {0: {"perplexity": measure(done.model, done.tokenizer, domains), "heal_seconds": 0.0}}
    healing_seconds = [0.0]
    clock = [time.perf_counter()]

    def after_step(step: int) -> None:
        healing_seconds[0] += time.perf_counter() - clock[0]
        if step in STEPS:
            curve[step] = {
                "perplexity": measure(done.model, done.tokenizer, domains),
                "heal_seconds": healing_seconds[0],
            }
        clock[0] = time.perf_counter()  # measuring is not healing

    settings = HealSettings(heal_steps=max(STEPS), heal_seed=seed, **HEALING)
    heal(done.model, original.model, original.tokenizer, texts, settings, after_step=after_step)
    return {
        "model": model_name, "row": row, "setting": setting, "layers": layers, "ratio": ratio, "seed": seed,
        "params": done.report.params_after, "params_original": done.report.params_before,
        "original_perplexity": measure(original.model, original.tokenizer, domains),
        "compress_seconds": compress_seconds, "sampling_seconds": sampling_seconds, "texts": len(texts),
        "curve": curve, "healing": settings.record(),
    }  # fmt: skip


def step_cost(steps: int = 10) -> None:
    """Seconds per healing step (8 texts of WebNLG training sentences, about 64 tokens each, every weight
    training) of SmolLM2 compressed at S1 by the paper recipe, and the process's peak memory."""
    lines = (DATA / "webnlg2017" / "enriched_v1.6_flat" / "train.jsonl").read_text().splitlines()[:400]
    sentences = [json.loads(line)["lex"][0]["text"] for line in lines]
    texts = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    original = load_model("smollm2")
    layers, ratio = SETTINGS["smollm2"]["S1"]
    done = compress("smollm2", layers=layers, ratio=ratio, recipe="paper")
    start = time.perf_counter()
    heal(done.model, original.model, original.tokenizer, texts, HealSettings(heal_steps=steps))
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    results = {**run_header(), "steps": steps, "seconds_per_step": seconds, "peak_gib": peak}
    raw = RESULTS.with_name("heal-step-cost.json")
    raw.write_text(json.dumps(results, indent=2) + "\n")
    intro = (
        f"One healing step of SmolLM2-135M compressed at layers {layers}, ratio {ratio} (paper recipe): 8 texts "
        "of about 64 tokens (four WebNLG training sentences each), the teacher's forward pass, the student's "
        f"forward and backward passes and an AdamW step over every weight, float32, {steps} steps, nothing "
        "else running. Peak memory is the process's (both models, gradients, optimizer moments)."
    )
    table = ["| seconds per step | peak memory |", "|---|---|", f"| {seconds:.1f} | {peak:.1f} GiB |"]
    print(publish("heal-step-cost", intro, table, results, raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--settings", default="S1,S2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--step-cost", action="store_true", help="only time healing steps (SmolLM2, S1)")
    args = parser.parse_args()
    if args.step_cost:
        return step_cost()
    if not DATA.is_dir():
        raise SystemExit(f"needs the held-out texts in {DATA}")
    held_out = domains("test")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {**run_header(), "runs": {}}
    for seed in map(int, args.seeds.split(",")):
        for model_name in args.models.split(","):
            for setting in args.settings.split(","):
                for row in args.rows.split(","):
                    key = f"{model_name} | {row} | {setting} | seed {seed}"
                    if key in results["runs"]:
                        continue
                    print(f"heal: {key}", file=sys.stderr, flush=True)
                    results["runs"][key] = run_row(model_name, row, setting, seed, held_out)
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

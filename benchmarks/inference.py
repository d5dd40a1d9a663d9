"""Greedy decoding speed: SmolLM2-135M original, fused (every layer at 0.25), and the fused model's
exported twin (a plain checkpoint of the same widths), in one process.

Each model decodes the same prompts one at a time, exactly --tokens new tokens each, after one warm-up
prompt; tokens/s is new tokens over wall time. The three models take turns on every prompt (the machine's
speed drifts within a run, so timing them one after the other would favour one), for --rounds rounds of
all prompts; the table gives the median round of each.

    python benchmarks/inference.py           # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "inference-smollm2.json"
PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "A recipe for bread starts with",
    "The three primary colours are",
    "In the morning, the train station",
]


def decode_seconds(model, tokenizer, prompt: str, new_tokens: int) -> float:
    batch = tokenizer(prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    import transformers

    import mlp_fusion
    from mlp_fusion.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model("smollm2")
    original, tokenizer = loaded.model, loaded.tokenizer
    fused = load_model("smollm2").model
    mlp_fusion.fuse(fused, mlp_fusion.FusionConfig(ratio=0.25))  # every layer: one width, so it exports
    with tempfile.TemporaryDirectory() as tmp:
        mlp_fusion.export(fused, f"{tmp}/plain")
        plain = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/plain", dtype=torch.float32).eval()
    models = {"original": original, "fused": fused, "exported twin": plain}
    for model in models.values():
        decode_seconds(model, tokenizer, PROMPTS[0], args.tokens)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in models}  # tokens/s of each round
    for round_number in range(args.rounds):
        seconds = dict.fromkeys(models, 0.0)
        for prompt in PROMPTS:  # the models take turns on every prompt, so a slow spell hits them all
            for name, model in models.items():
                seconds[name] += decode_seconds(model, tokenizer, prompt, args.tokens)
        for name in models:
            timings[name].append(len(PROMPTS) * args.tokens / seconds[name])
        print(round_number, {name: f"{values[-1]:.1f}" for name, values in timings.items()}, flush=True)
    rows = {name: statistics.median(values) for name, values in timings.items()}
    results = {
        **run_header(),
        "tokens_per_prompt": args.tokens,
        "prompts": len(PROMPTS),
        "rounds": args.rounds,
        "tokens_per_second": rows,
        "every_round": timings,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    rows, timings = results["tokens_per_second"], results["every_round"]
    twin = rows["exported twin"]
    lines = ["| model | tokens / s (median round) | rounds: min - max | relative to the exported twin |"]
    lines.append("|---|---|---|---|")
    lines += [
        f"| {name} | {value:.1f} | {min(timings[name]):.1f} - {max(timings[name]):.1f} | {value / twin:.3f} |"
        for name, value in rows.items()
    ]
    intro = (
        f"Greedy decoding with SmolLM2-135M (float32, CPU, batch 1): {results['prompts']} prompts, exactly "
        f"{results['tokens_per_prompt']} new tokens each, after one warm-up prompt; the three models take turns on every "
        f"prompt, {results['rounds']} rounds of all prompts, median round shown. Fused: every layer at ratio 0.25 (data-free fusion); "
        "exported twin: the same model with the scales folded in, saved by `mlp_fusion.export` and loaded "
        "with transformers."
    )
    return publish("inference-smollm2", intro, lines, results, RESULTS)


if __name__ == "__main__":
    main()

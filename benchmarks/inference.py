"""Greedy decoding speed: SmolLM2-135M original, fused (every layer at 0.25), and the fused model's
exported twin (a plain checkpoint of the same widths), in one process.

Each model decodes the same prompts one at a time, exactly --tokens new tokens each, after one warm-up
prompt; tokens/s is new tokens over wall time.

    python benchmarks/inference.py           # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kmeans import machine, provenance, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "inference-smollm2.json"
PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "A recipe for bread starts with",
    "The three primary colours are",
    "In the morning, the train station",
]


def tokens_per_second(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    def decode(prompt: str) -> None:
        batch = tokenizer(prompt, return_tensors="pt")
        model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip

    with torch.no_grad():
        decode(prompts[0])  # warm-up
        start = time.perf_counter()
        for prompt in prompts:
            decode(prompt)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    import transformers

    import mlp_fusion
    from mlp_fusion.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    loaded = load_model("smollm2")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = {"original": tokens_per_second(model, tokenizer, PROMPTS, args.tokens)}
    print(rows, flush=True)
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.25))  # every layer: one width, so it exports
    rows["fused"] = tokens_per_second(model, tokenizer, PROMPTS, args.tokens)
    print(rows, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mlp_fusion.export(model, f"{tmp}/plain")
        plain = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/plain", dtype=torch.float32).eval()
    rows["exported twin"] = tokens_per_second(plain, tokenizer, PROMPTS, args.tokens)
    results = {
        "command": "python benchmarks/inference.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": machine(),
        "tokens_per_prompt": args.tokens,
        "prompts": len(PROMPTS),
        "tokens_per_second": rows,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    twin = rows["exported twin"]
    lines = ["| model | tokens / s | relative to the exported twin |", "|---|---|---|"]
    lines += [f"| {name} | {value:.1f} | {value / twin:.3f} |" for name, value in rows.items()]
    body = (
        f"Greedy decoding with SmolLM2-135M (float32, CPU, batch 1): {len(PROMPTS)} prompts, exactly "
        f"{args.tokens} new tokens each, after one warm-up prompt. Fused: every layer at ratio 0.25 "
        "(data-free fusion); exported twin: the same model with the scales folded in, saved by "
        "`mlp_fusion.export` and loaded with transformers.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + provenance(results, RESULTS, ROOT)
    )
    write_section(ROOT / "BENCHMARKS.md", "inference-smollm2", body)
    print(body)


if __name__ == "__main__":
    main()

"""Peak memory and time of ``mlp-fusion compress``: streaming (one layer at a time) vs in memory.

Three checkpoints, each compressed both ways in fresh processes (peak memory: the process's high-water
mark of resident memory, file pages read through a mapping included):
- a LLaMA-shaped bfloat16 checkpoint with random weights, written by this script (TinyLlama's shape:
  hidden 2048, MLP 5632, 22 layers, vocabulary 32000; about 2.2 GB in 1 GB shards);
- SmolLM2-135M (the bundled float32 copy);
- SmolLM2-135M upcycled to 4 experts (top 2), whose experts are stacked in the model and stored per
  expert on disk.
Both ways must give the same tensors; the script checks that tensor by tensor.

``--calibrated`` compresses the synthetic LLaMA with 128 calibration texts (WebNLG training references,
tokenised by MiniLM's word-piece tokenizer, whose ids fit the LLaMA's vocabulary), calibrated fusion with
kept neurons, float32 compute: two layers both ways, then every layer layer by layer (and in memory too
with ``--whole-in-memory``: calibrating in memory runs the model up to each fused MLP twice, so its cost
grows with the square of the layer count, hours on 2 cores for all 22 layers).

    python benchmarks/streaming.py           # about 10 minutes on 2 cores
    python benchmarks/streaming.py --calibrated
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "streaming.json"
CALIBRATED = ROOT / "benchmarks" / "results" / "streaming-calibrated.json"
TEXTS = Path("..") / "shared" / "data" / "webnlg2017" / "enriched_v1.6_flat" / "train.jsonl"  # from ROOT
CLI = "import sys; from mlp_fusion.cli import main; sys.exit(main())"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec; VmHWM starts afresh.
MEASURED = """
import json, re, sys, time
from mlp_fusion.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_mb": peak / 1024}))
"""


def write_llama(directory: Path, layers: int) -> None:
    """A bfloat16 LLaMA-shaped checkpoint of random weights, written shard by shard (never whole in memory)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shards, shard, size, limit = [], {}, 0, 1 << 30
    for name, shape in shapes.items():
        values = (
            torch.ones(shape)
            if name.endswith("norm.weight")
            else torch.randn(shape, generator=generator) * 0.02
        )
        shard[name] = values.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= limit:
            shards.append(shard)
            save_file(shard, str(directory / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        shards.append(shard)
        save_file(shard, str(directory / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
    weight_map = {name: f"part-{i}.safetensors" for i, part in enumerate(shards, 1) for name in part}
    index = {
        "metadata": {"total_size": sum(v.numel() * 2 for p in shards for v in p.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def compress(source: str, out: Path, options: list[str], in_memory: bool) -> dict:
    recipe = [] if "--calibration" in options else ["--recipe", "paper"]
    arguments = ["compress", source, "--out", str(out), "--json", *recipe, *options]
    arguments += ["--in-memory"] if in_memory else []
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *arguments], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"compress {source} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    report, measured = json.loads(lines[-2]), json.loads(lines[-1])
    return {"seconds": measured["seconds"], "peak_mb": measured["peak_mb"], "streamed": report["streamed"]}


def same_tensors(left: Path, right: Path) -> bool:
    """Both outputs load to the same tensors (a tied weight may be stored under either of its names)."""
    import mlp_fusion

    a, b = mlp_fusion.from_pretrained(left).state_dict(), mlp_fusion.from_pretrained(right).state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def size_gb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9


def calibration_texts(path: Path, count: int) -> None:
    """The first reference of each of the first ``count`` WebNLG training entries, one per line."""
    lines = []
    with (ROOT / TEXTS).open() as rows:
        for row in rows:
            lexes = json.loads(row)["lex"]
            if lexes:
                lines.append(" ".join(lexes[0]["text"].split()))
            if len(lines) == count:
                break
    path.write_text("\n".join(lines) + "\n")


def run_calibrated(args) -> None:
    from mlp_fusion.loading import bundled_path, load_tokenizer

    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        write_llama(tmp / "llama", args.llama_layers)
        load_tokenizer(bundled_path("minilm")).save_pretrained(tmp / "llama")
        calibration_texts(tmp / "texts.txt", 128)
        common = ["--ratio", "0.25", "--calibration", str(tmp / "texts.txt"), "--max-length", "64",
                  "--dtype", "float32"]  # fmt: skip
        last_two = f"{args.llama_layers - 2}-{args.llama_layers - 1}"
        cases = {"two": (["--layers", last_two], True), "all": (["--layers", "all"], args.whole_in_memory)}
        cases = [cases[name] for name in args.cases.split(",")]
        for layers, both in cases:
            options = [*layers, *common]
            measured = {}
            for mode, in_memory in (("streaming", False), ("in memory", True))[: 2 if both else 1]:
                measured[mode] = compress(str(tmp / "llama"), tmp / mode, options, in_memory)
                print(layers, mode, measured[mode], flush=True)
            equal = same_tensors(tmp / "streaming", tmp / "in memory") if both else None
            for mode, m in measured.items():
                rows.append({"checkpoint": "synthetic LLaMA, bfloat16", "mode": mode, "options": layers,
                             "source_gb": size_gb(tmp / "llama"), "output_gb": size_gb(tmp / mode),
                             "same_tensors": equal, **m})  # fmt: skip
                subprocess.run(["rm", "-rf", str(tmp / mode)], check=True)
    recorded = [Path(option).name if option.endswith("texts.txt") else option for option in common]
    report_calibrated(write_results(CALIBRATED, {"rows": rows, "calibration": recorded}))  # no machine paths


def report_calibrated(results: dict) -> None:
    rows = results["rows"]
    lines = [
        "| fused | mode | checkpoint GB | peak resident MB | goal: 40% + 1 GB | seconds | same tensors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = 0.4 * r["source_gb"] * 1000 + 1000
        same = "-" if r["same_tensors"] is None else r["same_tensors"]
        lines.append(
            f"| {' '.join(r['options'])} --ratio 0.25 | {r['mode']} | {r['source_gb']:.2f} | "
            f"{r['peak_mb']:.0f} | {goal:.0f} | {r['seconds']:.0f} | {same} |"
        )
    intro = (
        "Calibrated `mlp-fusion compress` of the synthetic TinyLlama-shaped bfloat16 LLaMA (random weights) with "
        "128 calibration texts (the first WebNLG training references, at most 64 tokens, tokenised with "
        "MiniLM's word pieces), the calibrated recipe (keep fraction 0.5, refit), float32 compute "
        "(`--max-length 64 --dtype float32`). Each run in a fresh process; peak memory is VmHWM. Same "
        "tensors: both outputs loaded and compared tensor by tensor."
    )
    print(publish("streaming-calibrated", intro, lines, results, CALIBRATED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-layers", type=int, default=22, help="layers of the synthetic LLaMA (22: 2.2 GB)"
    )
    parser.add_argument("--calibrated", action="store_true", help="the calibrated runs instead")
    parser.add_argument("--cases", default="two,all", help="with --calibrated: two (last two layers), all")
    parser.add_argument(
        "--whole-in-memory", action="store_true", help="with --calibrated: every layer in memory too (hours)"
    )
    parser.add_argument("--report", action="store_true", help="with --calibrated: only rewrite BENCHMARKS.md")
    args = parser.parse_args()
    if args.calibrated and args.report:
        return report_calibrated(json.loads(CALIBRATED.read_text()))
    if args.calibrated:
        return run_calibrated(args)
    rows, last_two = [], f"{args.llama_layers - 2}-{args.llama_layers - 1}"
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        write_llama(tmp / "llama", args.llama_layers)
        subprocess.run(
            [sys.executable, "-c", CLI, "upcycle", "smollm2", "--experts", "4", "--top-k", "2", "--out", str(tmp / "moe")],
            check=True, capture_output=True, cwd=ROOT,
        )  # fmt: skip
        from mlp_fusion.loading import bundled_path

        cases = [
            ("synthetic LLaMA, bfloat16", str(tmp / "llama"), ["--layers", last_two, "--ratio", "0.25"]),
            ("SmolLM2-135M, float32", str(bundled_path("smollm2")), ["--layers", "25-29", "--ratio", "0.25"]),
            ("SmolLM2-135M upcycled, 4 experts", str(tmp / "moe"), ["--layers", "28-29", "--ratio", "0.25"]),
        ]
        for label, source, options in cases:
            source_gb = size_gb(Path(source))
            measured = {}
            for mode, in_memory in (("streaming", False), ("in memory", True)):
                measured[mode] = compress(source, tmp / mode, options, in_memory)
                print(label, mode, measured[mode], flush=True)
            equal = same_tensors(tmp / "streaming", tmp / "in memory")
            for mode, m in measured.items():
                rows.append({"checkpoint": label, "mode": mode, "source_gb": source_gb, "options": options,
                             "output_gb": size_gb(tmp / mode), "same_tensors": equal, **m})  # fmt: skip
            for mode in measured:
                subprocess.run(["rm", "-rf", str(tmp / mode)], check=True)
    results = write_results(RESULTS, {"rows": rows})
    lines = [
        "| checkpoint | fused | mode | checkpoint GB | peak resident MB | goal: 40% + 1 GB | seconds | output GB | same tensors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = 0.4 * r["source_gb"] * 1000 + 1000
        lines.append(
            f"| {r['checkpoint']} | {' '.join(r['options'])} | {r['mode']} | {r['source_gb']:.2f} | "
            f"{r['peak_mb']:.0f} | {goal:.0f} | {r['seconds']:.0f} | {r['output_gb']:.2f} | {r['same_tensors']} |"
        )
    intro = (
        "`mlp-fusion compress` on three checkpoints, layer by layer (the default for local safetensors "
        "checkpoints) and with `--in-memory`, each run in a fresh process; peak memory is the process's "
        "high-water mark of resident memory (VmHWM), time the whole command (loading, k-means, writing). "
        "The synthetic LLaMA has TinyLlama's shape with random bfloat16 weights; default output shards "
        "(2 GB). Same tensors: both outputs loaded with `mlp_fusion.from_pretrained` and compared tensor by "
        "tensor."
    )
    print(publish("streaming", intro, lines, results, RESULTS))


if __name__ == "__main__":
    main()

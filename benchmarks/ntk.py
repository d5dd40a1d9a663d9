"""What each method preserves, and how fast the kernels are computed.

1. Speed: the empirical kernels of MiniLM (64 SST-2 dev probes, every MLP tensor of all layers) computed
   the batched way (hooks, one forward/backward per micro-batch) and the naive way (one example per
   backward pass, as the research code did), in the same run; their kernels are compared too.
2. The paper's comparison: MiniLM-L6 with layers 2-5 fused at ratios 0.5 / 0.25 / 0.125, every method,
   64 SST-2 dev probes, seeds 0, 1, 2 (mean and standard deviation).

    python benchmarks/ntk.py                 # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

from mlp_fusion.batches import probe_batch, read_probe_texts  # noqa: E402
from mlp_fusion.diagnostics import compare_methods, empirical_kernels, kernel_error  # noqa: E402
from mlp_fusion.diagnostics.parameters import kernel_modules, module_tensors  # noqa: E402
from mlp_fusion.diagnostics.plot import plot_rows  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402
from mlp_fusion.methods import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBES = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
SETUPS = {"minilm": [2, 3, 4, 5], "mpnet": list(range(4, 12))}
METRICS = ["output_error", "layer_output_error", "adam_error", "adam_alignment", "sgd_error", "sgd_alignment"]


def speed(model, batch: dict, batch_size: int) -> dict:
    modules = kernel_modules(model, "mlp", "all")
    empirical_kernels(model, {k: v[:batch_size] for k, v in batch.items()}, modules[:2])  # warm-up
    timings, kernels = {}, {}
    for name, naive in (("batched", False), ("naive", True)):
        start = time.perf_counter()
        kernels[name] = empirical_kernels(model, batch, modules, batch_size=batch_size, naive=naive)
        timings[name] = time.perf_counter() - start
    agreement = {k: kernel_error(kernels["naive"][k], kernels["batched"][k])[0] for k in kernels["naive"]}
    parameters = sum(p.numel() for m in modules for p in module_tensors(m))
    return {
        "seconds": timings,
        "relative_difference": agreement,
        "parameters": parameters,
        "batch_size": batch_size,
    }


def summarise(runs: list[list[dict]]) -> list[dict]:
    summary = []
    for rows in zip(*runs):
        entry = {"method": rows[0]["method"], "ratio": rows[0]["ratio"], "params": rows[0]["params"]}
        for key in METRICS:
            values = [row[key] for row in rows]
            entry[key] = statistics.mean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(results: dict) -> str:
    s = results["speed"]
    lines = [
        f"Speed, {s['probes']} probes, every MLP tensor of MiniLM ({s['parameters']:,} parameters): batched "
        f"{s['seconds']['batched']:.1f} s, naive (one example per backward pass) {s['seconds']['naive']:.1f} s, "
        f"{s['seconds']['naive'] / s['seconds']['batched']:.2f}x; kernels agree to "
        + ", ".join(f"{k} {v:.1e}" for k, v in s["relative_difference"].items())
        + " (relative Frobenius difference).",
        "",
    ]
    for model, summary in results["comparison"].items():
        lines += [
            f"{model}, layers {results['layers'][model]}, {results['probes']} SST-2 dev probes, seeds "
            f"{results['seeds']} (mean ± std); errors are relative Frobenius errors against the unfused model, "
            "alignment is the cosine of the two kernels:",
            "",
            "| method | ratio | output error | mean layer error | Adam error | Adam alignment | SGD error | SGD alignment | parameters |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in summary:
            cells = [f"{row[k]:.3f} ± {row[k + '_std']:.3f}" for k in METRICS]
            lines.append(
                f"| {row['method']} | {row['ratio']:g} | " + " | ".join(cells) + f" | {row['params']:,} |"
            )
        lines += ["", f"![{model} kernels](benchmarks/results/ntk-{model}.png)"]
    return "\n".join(lines)


def report(results: dict, raw: Path) -> str:
    return publish(raw.stem, markdown(results), [], results, raw)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm", help="comma-separated: minilm, mpnet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--ratios", default="0.5,0.25,0.125")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    texts = read_probe_texts(PROBES, args.probes)

    minilm = load_model("minilm")
    batch = probe_batch(minilm.model, minilm.tokenizer, count=len(texts), texts=texts)
    results = {
        **run_header(),
        "probes": len(texts),
        "seeds": seeds,
        "layers": {},
        "speed": {"probes": len(texts), **speed(minilm.model, batch, args.batch_size)},
        "comparison": {},
        "runs": {},
    }
    print(json.dumps(results["speed"]), file=sys.stderr, flush=True)
    for name in args.models.split(","):
        loaded = minilm if name == "minilm" else load_model(name)
        batch = probe_batch(loaded.model, loaded.tokenizer, count=len(texts), texts=texts)
        runs = []
        for seed in seeds:
            result = compare_methods(
                loaded.model,
                batch,
                batch_size=args.batch_size,
                methods=list(METHODS),
                ratios=ratios,
                layers=SETUPS[name],
                seed=seed,
                progress=lambda m, s=seed: print(f"seed {s}: {m}", file=sys.stderr),
            )
            runs.append(result["rows"])
        results["layers"][name] = f"{SETUPS[name][0]}-{SETUPS[name][-1]}"
        results["runs"][name] = runs
        results["comparison"][name] = summarise(runs)
        plot_rows(
            results["comparison"][name],
            ("adam", "sgd"),
            ROOT / "benchmarks" / "results" / f"ntk-{name}.png",
            title=f"{name}, layers {results['layers'][name]}, mean of seeds {args.seeds}",
        )
    out = ROOT / "benchmarks" / "results" / f"ntk-{args.models.replace(',', '-')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, out))


if __name__ == "__main__":
    main()

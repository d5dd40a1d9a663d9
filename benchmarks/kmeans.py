"""k-means on real sub-MLP weights: mlp-fusion's k-means against scikit-learn, in the same run.

Baseline: scikit-learn ``KMeans(n_init=30, algorithm="lloyd")``, the research code's setting, and ``n_init=1``.
Rows are the sub-MLP vectors ``[W_in | b_in | W_out^T]`` of each layer, float32, ratio 0.25. Inertia of every
variant is recomputed the same way (float64, from the returned labels and centers). Also times the whole
``make demo`` job (``mlp-fusion compress`` on MiniLM, layers 2-5, save, reload, verify).

    python benchmarks/kmeans.py                      # MiniLM, all 6 layers (about 6 minutes on 2 cores)
    python benchmarks/kmeans.py --models mpnet --mpnet-layers 0,6   # MPNet-base, two layers (about 25 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans as SkKMeans

from mlp_fusion import find_sites, k_means
from mlp_fusion.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RATIO = 0.25


def inertia(x: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    residual = x.astype(np.float64) - centers.astype(np.float64)[labels]
    return float((residual * residual).sum())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_sklearn(x: np.ndarray, k: int, n_init: int) -> dict:
    fitted, seconds = timed(lambda: SkKMeans(k, n_init=n_init, algorithm="lloyd", random_state=0).fit(x))
    return {"seconds": seconds, "inertia": inertia(x, fitted.cluster_centers_, fitted.labels_)}


def run_ours(x: torch.Tensor, k: int, **options) -> dict:
    result, seconds = timed(lambda: k_means(x, k, seed=0, **options))
    return {"seconds": seconds, "inertia": inertia(x.numpy(), result.centers.numpy(), result.labels.numpy())}


def layer_rows(model_name: str, layers: list[int] | None) -> list[tuple[int, torch.Tensor]]:
    model = load_model(model_name).model
    return [
        (site.layer, site.read().rows()[0].float().contiguous())
        for site in find_sites(model)
        if layers is None or site.layer in layers
    ]


def benchmark_model(model_name: str, layers: list[int] | None, with_sklearn_30: bool) -> list[dict]:
    rows = []
    for layer, x in layer_rows(model_name, layers):
        k = round(RATIO * x.shape[0])
        numpy_x = x.numpy()
        row = {"model": model_name, "layer": layer, "shape": f"{x.shape[0]} x {x.shape[1]} -> {k}"}
        if with_sklearn_30:
            row["sklearn_30"] = run_sklearn(numpy_x, k, 30)
        row["sklearn_1"] = run_sklearn(numpy_x, k, 1)
        row["ours_lloyd"] = run_ours(x, k, hartigan_rounds=0)
        row["ours"] = run_ours(x, k)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def time_demo_job() -> float:
    script = Path(sys.executable).parent / "mlp-fusion"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            str(script),
            "compress",
            "minilm",
            "--ratio",
            "0.25",
            "--layers",
            "2-5",
            "--out",
            f"{tmp}/out",
            "--verify",
        ]
        _, seconds = timed(lambda: subprocess.run(args, check=True, capture_output=True))
    return seconds


def markdown(results: dict) -> str:
    variants = [
        ("sklearn_30", "sklearn n_init=30"),
        ("sklearn_1", "sklearn n_init=1"),
        ("ours_lloyd", "ours, Lloyd only"),
        ("ours", "ours (default)"),
    ]
    present = [(key, label) for key, label in variants if key in results["rows"][0]]
    header = (
        "| model | layer | n × p → k | " + " | ".join(f"{label} inertia / s" for _, label in present) + " |"
    )
    lines = [header, "|" + "---|" * (3 + len(present))]
    for row in results["rows"]:
        cells = [f"{row[key]['inertia']:,.1f} / {row[key]['seconds']:.1f}" for key, _ in present]
        lines.append(f"| {row['model']} | {row['layer']} | {row['shape']} | " + " | ".join(cells) + " |")
    lines.append("")
    for model in sorted({row["model"] for row in results["rows"]}):
        rows = [row for row in results["rows"] if row["model"] == model]
        total = {
            key: (sum(r[key]["inertia"] for r in rows), sum(r[key]["seconds"] for r in rows))
            for key, _ in present
        }
        parts = [f"{label}: inertia {total[key][0]:,.1f} in {total[key][1]:.1f} s" for key, label in present]
        lines.append(f"- **{model}, {len(rows)} layers** — " + "; ".join(parts) + ".")
        if "sklearn_30" in total:
            ratio = total["ours"][0] / total["sklearn_30"][0]
            speedup = total["sklearn_30"][1] / total["ours"][1]
            lines.append(
                f"  Ours vs sklearn n_init=30: inertia {100 * (ratio - 1):+.2f}%, {speedup:.0f}x less time."
            )
    lines.append(
        f"- Whole `make demo` job (`mlp-fusion compress` on MiniLM, layers 2-5, save, reload, verify): "
        f"{results['demo_seconds']:.1f} s wall."
    )
    info = results["machine"]
    lines.append(
        f"\nTorch threads {info['torch_threads']}; Python {info['python']}, scikit-learn {info['scikit-learn']}, "
        f"numpy {info['numpy']}. Seeds: 0 (ours and sklearn's random_state)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm", help="comma-separated: minilm, mpnet")
    parser.add_argument("--mpnet-layers", default="0,6", help="MPNet layers to measure (each costs ~10 min)")
    parser.add_argument("--no-sklearn-30", action="store_true", help="skip the slow n_init=30 baseline")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    rows = []
    for model in args.models.split(","):
        layers = [int(i) for i in args.mpnet_layers.split(",")] if model == "mpnet" else None
        rows += benchmark_model(model, layers, not args.no_sklearn_30)
    results = {
        **run_header(),
        "ratio": RATIO,
        "rows": rows,
        "demo_seconds": time_demo_job(),
    }
    name = "kmeans-" + args.models.replace(",", "-")
    json_path = ROOT / "benchmarks" / "results" / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(publish(name, markdown(results), [], results, json_path))


if __name__ == "__main__":
    main()

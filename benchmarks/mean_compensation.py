"""Mean compensation: does adding each fused MLP's mean output error back as a bias help?

The default compress of SmolLM2 at the S1 shape (the study's seed-0 model; made by `benchmarks/study.py`
when missing) gets, layer after layer, a bias on each fused MLP's down projection equal to the mean of
(original MLP - fused MLP) over every token of its own 128 calibration texts, each layer's inputs coming
from the already compensated layers before it. Held-out perplexity before and after, on the validation
texts of `benchmarks/_held_out.py` (a choice: keep it or not), against the original.

    python benchmarks/mean_compensation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import domains, measure  # noqa: E402
from _report import ROOT, publish, rewrite_only, write_results  # noqa: E402
from study import ROWS, compressed  # noqa: E402

from mlp_fusion.batches import pad_right  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RAW = ROOT / "benchmarks" / "results" / "mean-compensation-smollm2.json"


def compensate(original, fused, batch: dict) -> dict[int, float]:
    """Give each fused MLP of ``fused`` the bias that cancels its mean error on ``batch``; returns the norm
    of each bias by layer."""
    pairs = zip(original.model.layers, fused.model.layers)
    layers = [
        i for i, (a, b) in enumerate(pairs) if a.mlp.gate_proj.out_features != b.mlp.gate_proj.out_features
    ]
    mask, norms, seen = batch["attention_mask"].bool(), {}, {}
    for index in layers:
        mlp = fused.model.layers[index].mlp
        handle = mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
        with torch.no_grad():
            fused.model(**batch)  # the body only: no logits needed
            inputs = seen["x"][mask]
            error = (original.model.layers[index].mlp(inputs) - mlp(inputs)).mean(0)
        handle.remove()
        mlp.down_proj.bias = torch.nn.Parameter(error.clone())
        norms[index] = float(error.norm())
    return norms


def main() -> None:
    if rewrite_only(__doc__, RAW, report):
        return
    torch.set_num_threads(2)
    source = Path(compressed(ROWS["S1-default"], seed=0)[0])
    original, fused = load_model("smollm2"), load_model(str(source))
    tokenizer = fused.tokenizer
    calibration = [
        text for text in (source / "calibration-samples.txt").read_text().split("\n") if text.strip()
    ]
    batch = pad_right([tokenizer(text, truncation=True, max_length=128)["input_ids"] for text in calibration])
    texts = domains("validation")
    rows = {
        "original": measure(original.model, tokenizer, texts),
        "fused": measure(fused.model, tokenizer, texts),
    }
    norms = compensate(original.model, fused.model, batch)
    rows["fused, mean compensated"] = measure(fused.model, tokenizer, texts)
    print(report(write_results(RAW, {"model": str(source), "bias_norms": norms, "rows": rows})))


def report(results: dict) -> str:
    rows = results["rows"]
    table = ["| model | WebNLG dev | E2E dev | SST-2 dev |", "|---|---:|---:|---:|"]
    table += [
        f"| {name} | " + " | ".join(f"{value:.2f}" for value in row.values()) + " |"
        for name, row in rows.items()
    ]
    intro = (
        "Each fused MLP of the default compress of SmolLM2 at layers 20-29 / 0.5 given a down-projection bias "
        "equal to its mean output error on its 128 calibration texts (layer after layer), perplexity on 200 "
        "validation texts per domain before and after. The change is about 0.1%: not kept."
    )
    return publish("mean-compensation-smollm2", intro, table, results, RAW)


if __name__ == "__main__":
    main()

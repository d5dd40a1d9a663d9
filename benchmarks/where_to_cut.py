"""Where to cut for a given size: SmolLM2 compressed to the S1 and S2 parameter counts by different plans,
with `mlp-fusion compress`'s default recipe, compared by held-out perplexity before any healing or task.

Plans at each count: today's contiguous block (S1: layers 20-29 at 0.5; S2: layers 10-29 at 0.25); every
layer at the one ratio that gives the same count (S1: 5/6, S2: 0.5); and `--budget` at that fraction over
every layer (widths spread by each layer's calibrated error curve). The choice of plan is made on
validation texts (WebNLG 2017 dev references, E2E dev references, SST-2 dev sentences) and reported on test
texts (the same three test sets); 200 texts of each drawn at random (seed 0), reported per domain. One
sampling seed (0): the recipe's calibration texts are the same for every plan. Plans are saved as they
finish, and a rerun skips them.

    python benchmarks/where_to_cut.py          # about half an hour on two cores
    python benchmarks/where_to_cut.py --report # the section again from the saved results
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _held_out import TEXTS, domains, measure, over_original  # noqa: E402
from _report import ROOT, publish, rewrite_only, write_results  # noqa: E402

from mlp_fusion import compress  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402

RAW = ROOT / "benchmarks" / "results" / "where-to-cut-smollm2.json"
PLANS = {
    "S1": {
        "block 20-29 at 0.5": {"layers": "20-29", "ratio": 0.5},
        "every layer at 5/6": {"layers": "all", "ratio": 5 / 6},
        "budget 5/6 over every layer": {"layers": "all", "budget": 5 / 6},
    },
    "S2": {
        "block 10-29 at 0.25": {"layers": "10-29", "ratio": 0.25},
        "every layer at 0.5": {"layers": "all", "ratio": 0.5},
        "budget 0.5 over every layer": {"layers": "all", "budget": 0.5},
    },
}


def scores(model, tokenizer, texts: dict) -> dict:
    return {split: measure(model, tokenizer, sets) for split, sets in texts.items()}


def run_plan(options: dict, texts: dict) -> dict:
    start = time.perf_counter()
    done = compress("smollm2", None, seed=0, **options)
    seconds = time.perf_counter() - start
    widths = [layer.width_after for layer in done.report.layers]
    return {
        "options": options, "compress_seconds": seconds, "parameters": done.model.num_parameters(),
        "widths": widths, "perplexity": scores(done.model, done.tokenizer, texts),
    }  # fmt: skip


def main() -> None:
    if rewrite_only(__doc__, RAW, report):
        return
    saved = json.loads(RAW.read_text()) if RAW.is_file() else {}
    texts = {split: domains(split) for split in ("validation", "test")}
    rows = saved.get("rows", {})
    if "original" not in rows:
        original = load_model("smollm2")
        rows["original"] = {"parameters": original.model.num_parameters(),
                            "perplexity": scores(original.model, original.tokenizer, texts)}  # fmt: skip
    for cut, plans in PLANS.items():
        for plan, options in plans.items():
            key = f"{cut} | {plan}"
            if key not in rows:
                print(f"{key} ...", file=sys.stderr, flush=True)
                rows[key] = run_plan(options, texts)
                write_results(RAW, {"texts_per_domain": TEXTS, "rows": rows})
    print(report(write_results(RAW, {"texts_per_domain": TEXTS, "rows": rows})))


def report(results: dict) -> str:
    rows = results["rows"]
    original = rows["original"]["perplexity"]
    table = [
        "| cut | plan | parameters | validation (x original, geometric mean of 3) | test WebNLG | test E2E "
        "| test SST-2 | test, x original (geometric mean) | compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chosen = []
    for cut, plans in PLANS.items():
        done = {plan: rows[f"{cut} | {plan}"] for plan in plans if f"{cut} | {plan}" in rows}

        def relative(row: dict, split: str) -> float:
            return over_original(row["perplexity"][split], original[split])

        for plan, row in done.items():
            test = row["perplexity"]["test"]
            table.append(
                f"| {cut} | {plan} | {row['parameters'] / 1e6:.1f} M | {relative(row, 'validation'):.2f}x "
                f"| {test['webnlg']:.1f} | {test['e2e']:.1f} | {test['sst2']:.1f} | {relative(row, 'test'):.2f}x "
                f"| {row['compress_seconds']:.0f} |"
            )
        if done:
            best = min(done, key=lambda plan: relative(done[plan], "validation"))
            chosen.append(
                f"{cut}: validation chooses **{best}** ({relative(done[best], 'test'):.2f}x on test)"
            )
    test = original["test"]
    table.append(
        f"| - | original | {rows['original']['parameters'] / 1e6:.1f} M | 1.00x | {test['webnlg']:.1f} "
        f"| {test['e2e']:.1f} | {test['sst2']:.1f} | 1.00x | - |"
    )
    intro = (
        "SmolLM2 compressed to the S1 and S2 parameter counts by three plans each, with the default recipe "
        "(no healing), perplexity before any task. The plan is chosen on validation texts (WebNLG 2017 dev, "
        "E2E dev, SST-2 dev) and reported on test texts (their test sets), "
        f"{results['texts_per_domain']} of each drawn at random (seed 0); one sampling seed.\n\n"
        + "\n".join(f"- {line}" for line in chosen)
    )
    return publish("where-to-cut-smollm2", intro, table, results, RAW)


if __name__ == "__main__":
    main()

"""What a user gets from ``compress`` with no flag but layers and ratio: SmolLM2-135M, perplexity before fine-tuning.

For each WebNLG fine-tuning setting (S1: layers 20-29 at 0.5, S2: layers 10-29 at 0.25), the perplexity of
200 held-out WebNLG dev texts (dev 100-299, as in ``decoder.py perplexity``) for: the original model; the
default recipe (``mlp_fusion.compress`` as the command runs it: 128 texts sampled from the model as
calibration, fusion with half of each fused width kept); the paper recipe (``--recipe paper``: data-free
fusion, the old default); calibrated pruning on the same sampled texts; and, for reference, the default
recipe and calibrated pruning on 128 and on 512 in-domain texts (the first WebNLG train texts). Rows are
saved as they finish and a rerun skips them.

    python benchmarks/default_recipe.py                  # about an hour on 2 cores
    python benchmarks/default_recipe.py --model gemma3   # Gemma-3-270M (layers 12-17 / 6-17)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402
from decoder import webnlg_texts  # noqa: E402

from mlp_fusion import compress  # noqa: E402
from mlp_fusion.diagnostics.perplexity import perplexity  # noqa: E402
from mlp_fusion.loading import load_model  # noqa: E402
from mlp_fusion.recipes import RECIPE_ATTR, RECIPES  # noqa: E402
from mlp_fusion.records import fusion_records  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}
# per model: its settings (the last third at 0.5, the last two thirds at 0.25)
MODELS = {
    "smollm2": {"S1": ("20-29", 0.5), "S2": ("10-29", 0.25)},
    "gemma3": {"S1": ("12-17", 0.5), "S2": ("6-17", 0.25)},
}
# label -> (recipe, method, calibration: "sampled" (the recipe's own), "in-domain" or None[, config fields])
ROWS = {
    "default (calibrated recipe, sampled texts)": ("auto", "fusion", "sampled"),
    "paper recipe (data-free fusion)": ("paper", "fusion", None),
    "prune+calibration, sampled texts": ("calibrated", "prune", "sampled"),
    "default recipe, in-domain texts": ("auto", "fusion", "in-domain"),
    "prune+calibration, in-domain texts": ("calibrated", "prune", "in-domain"),
    "default recipe, 512 in-domain texts": ("auto", "fusion", "in-domain 512"),
    "prune+calibration, 512 in-domain texts": ("calibrated", "prune", "in-domain 512"),
    "default + 300 reconstruction steps (ridge 0.1), sampled texts": (
        "auto",
        "fusion",
        "sampled",
        {"reconstruct_steps": 300, "ridge": 0.1},
    ),
}
MAIN_ROWS = tuple(ROWS)  # the main table's rows; the ridge rows below are summed up in a table of their own
# the refit's ridge weight (FusionConfig.ridge, default 0.1): each recipe on three disjoint sets of 128
# in-domain texts (a spread over calibration sets) and on the sampled texts
RIDGES = (0.1, 0.3, 1.0)
IN_DOMAIN_SETS = 3
RIDGE_RECIPES = {"default recipe": ("auto", "fusion"), "prune+calibration": ("calibrated", "prune")}


# the kept share of each fused width (the recipe's is 0.5, in the ridge table's ridge-1 rows), refit with
# the recipe's ridge weight, on the same calibration sets
KEEPS = (0.25, 0.75)


def grid_rows(label: str, recipe: str, method: str, fields: dict) -> dict[str, tuple]:
    """``label``'s rows on each in-domain set and on the sampled texts, with ``fields`` given to compress."""
    sets = [f"in-domain set {number}" for number in range(1, IN_DOMAIN_SETS + 1)]
    return {
        f"{label}, {calibration}": (
            recipe,
            method,
            "sampled" if calibration == "sampled texts" else calibration,
            fields,
        )
        for calibration in (*sets, "sampled texts")
    }


def ridge_rows() -> dict[str, tuple]:
    """Each ridge-table row: per recipe and weight, the in-domain sets and the sampled texts."""
    rows = {}
    for ridge in RIDGES:
        for name, (recipe, method) in RIDGE_RECIPES.items():
            rows.update(grid_rows(f"{name}, ridge {ridge:g}", recipe, method, {"ridge": ridge}))
    return rows


def keep_rows() -> dict[str, tuple]:
    recipe, method = RIDGE_RECIPES["default recipe"]
    rows = {}
    for keep in KEEPS:
        rows.update(grid_rows(f"default recipe, keep {keep:g}", recipe, method, {"keep_fraction": keep}))
    return rows


ROWS.update(ridge_rows())
ROWS.update(keep_rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=MODELS)
    parser.add_argument("--settings", default="S1,S2")
    parser.add_argument("--only", default="", help="only the rows whose label this regular expression finds")
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    args = parser.parse_args()
    raw = results_file(args.model)
    results = json.loads(raw.read_text()) if raw.exists() else {"rows": {}}
    header = run_header()
    results.update({k: v for k, v in header.items() if k != "command"})
    if not args.report:  # every run that added rows, in order
        results["commands"] = list(dict.fromkeys([*results.get("commands", []), header["command"]]))
    texts = webnlg_texts("dev", 100, 200)
    in_domain = webnlg_texts("train", 0, 512)
    if not args.report:
        settings = {name: MODELS[args.model][name] for name in args.settings.split(",")}
        measure(args.model, settings, results, texts, in_domain, args.only)
    print(report(args.model, results))


def results_file(model: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"default-recipe-{model}.json"


def calibration_sets(in_domain: list[str], sampled: list[str] | None) -> dict[str, list[str] | None]:
    sets = {"in-domain": in_domain[:128], "in-domain 512": in_domain, "sampled": sampled}
    for number in range(1, IN_DOMAIN_SETS + 1):
        sets[f"in-domain set {number}"] = in_domain[128 * (number - 1) : 128 * number]
    return sets


def measure(
    model: str, settings: dict, results: dict, texts: list[str], in_domain: list[str], only: str
) -> None:
    rows = results["rows"]
    if "original" not in rows:
        loaded = load_model(model)
        rows["original"] = perplexity(loaded.model, loaded.tokenizer, texts)
        save(model, results)
    # the recipe's samples (seeded), kept so that a rerun need not draw them again
    sampled = results.get("samples")
    for setting, (layers, ratio) in settings.items():
        for label, (recipe, method, calibration, *extra) in ROWS.items():
            key = f"{label} | {setting}"
            if key in rows or not re.search(only, label):
                continue
            given = calibration_sets(in_domain, sampled).get(calibration)
            start = time.perf_counter()
            done = compress(
                model,
                recipe=recipe,
                method=method,
                layers=layers,
                ratio=ratio,
                calibration_texts=given,
                **({"calibration_samples": len(given)} if given else {}),
                **(extra[0] if extra else {}),
            )
            seconds = time.perf_counter() - start
            if calibration == "sampled" and sampled is None:
                sampled = results["samples"] = getattr(done.model, RECIPE_ATTR)["samples"]
            rows[key] = {
                **perplexity(done.model, done.tokenizer, texts),
                "seconds": seconds,
                "params": done.report.params_after,
                "keep_fraction": fusion_records(done.model)[0].settings["keep_fraction"],
            }
            save(model, results)
            print(key, rows[key]["perplexity"], file=sys.stderr, flush=True)


def save(model: str, results: dict) -> None:
    raw = results_file(model)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2) + "\n")


def report(model: str, results: dict) -> str:
    rows = results["rows"]
    original = rows["original"]["perplexity"]
    lines = [
        "| setting | row | perplexity | x original | keep fraction | seconds |",
        "|---|---|---|---|---|---|",
        f"| - | original | {original:.1f} | 1.00 | - | - |",
    ]
    settings = dict.fromkeys(key.partition(" | ")[2] for key in rows if " | " in key)
    for setting, label in ((setting, label) for setting in settings for label in MAIN_ROWS):
        if (row := rows.get(f"{label} | {setting}")) is None:
            continue
        lines.append(
            f"| {setting} | {label} | {row['perplexity']:.1f} | {row['perplexity'] / original:.2f} "
            f"| {row['keep_fraction']} | {row['seconds']:.0f} |"
        )
    for table in (ridge_lines(rows, settings), keep_lines(rows, settings)):
        if table:
            lines += ["", *table]
    settings = "; ".join(
        f"{name}: layers {layers} at {ratio}" for name, (layers, ratio) in MODELS[model].items()
    )
    intro = (
        f"{NAMES[model]} compressed as `mlp_fusion.compress` (the library verb behind `mlp-fusion compress`) "
        f"does it, no fine-tuning: perplexity of 200 held-out WebNLG dev texts. {settings}. The default recipe samples 128 texts from the model (from its BOS token, "
        "top-p 0.95, 96 new tokens, seed 0) as calibration, keeps half of each fused width as its "
        "top-scored neurons and refits with ridge weight 1 (0.1 until 2026-12-03); calibrated pruning uses the same sampled texts; the in-domain rows use the "
        "first 128 (or 512) WebNLG train texts instead. The ridge table refits with the weight given "
        "(`ridge`) on three disjoint sets of 128 in-domain texts (train texts 0-127, 128-255, 256-383) and on "
        "the sampled texts; its ridge-0.1 rows include the main table's rows as they were measured before "
        "the recipe's weight became 1. The kept-share table refits with the recipe's weight on the same sets, "
        "the share kept as top-scored neurons given (`keep_fraction`); calibrated pruning keeps all of them. "
        "Seconds include sampling and were measured while "
        "other benchmarks shared the CPU; rows measured before in-memory calibration walked the layers "
        "(SmolLM2's paper row and ridge-0.1 sampled-text rows at S1, of 2026-12-02) ran the whole model for "
        "every fused MLP."
    )
    return publish(f"default-recipe-{model}", intro, lines, results, results_file(model))


def ridge_lines(rows: dict, settings) -> list[str]:
    """Perplexity by ridge weight: mean ± std over the in-domain sets measured, and on the sampled texts."""
    entries = [(name, f"{ridge:g}", f"{name}, ridge {ridge:g}") for name in RIDGE_RECIPES for ridge in RIDGES]
    return grid_lines(rows, settings, ("recipe", "ridge"), entries)


def keep_lines(rows: dict, settings) -> list[str]:
    """Perplexity by kept share at the recipe's ridge weight; calibrated pruning's neurons are all kept ones."""
    recipe = RECIPES["calibrated"]
    at_recipe_ridge = f"ridge {recipe.ridge:g}"  # the ridge table's rows hold the recipe's own share
    shares = sorted([*KEEPS, recipe.keep_fraction])
    entries = [
        (
            "default recipe",
            f"{keep:g}",
            f"default recipe, {at_recipe_ridge if keep == recipe.keep_fraction else f'keep {keep:g}'}",
        )
        for keep in shares
    ]
    entries.append(("prune+calibration", "all", f"prune+calibration, {at_recipe_ridge}"))
    return grid_lines(rows, settings, ("recipe", "kept share"), entries)


def grid_lines(rows: dict, settings, columns: tuple[str, str], entries: list[tuple]) -> list[str]:
    """A table of (name, value, row label) entries: mean ± std over the in-domain sets, and the sampled texts."""
    lines = [
        f"| setting | {columns[0]} | {columns[1]} | in-domain sets | perplexity, in-domain (mean ± std) "
        "| perplexity, sampled texts |",
        "|---|---|---|---|---|---|",
    ]
    for setting in settings:
        for name, value, label in entries:
            values = [
                rows[key]["perplexity"]
                for number in range(1, IN_DOMAIN_SETS + 1)
                if (key := f"{label}, in-domain set {number} | {setting}") in rows
            ]
            sampled = rows.get(f"{label}, sampled texts | {setting}")
            if not values and not sampled:
                continue
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            mean = f"{statistics.mean(values):.1f}{spread}" if values else "-"
            on_samples = f"{sampled['perplexity']:.1f}" if sampled else "-"
            lines.append(f"| {setting} | {name} | {value} | {len(values)} | {mean} | {on_samples} |")
    return lines if len(lines) > 2 else []


if __name__ == "__main__":
    main()

"""The study's section of BENCHMARKS.md, from its files alone: the validation grid and the rates it chose,
then (once test runs exist) every row's test BLEU over its seeds and the goals judged on paired intervals.

    python benchmarks/study_report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, provenance, write_section  # noqa: E402
from study import DATA, MODEL, ROWS, STUDY, choices, load_validation, validation_file  # noqa: E402
from study_cost import COST, costs  # noqa: E402
from study_statistics import bleu_interval, bleu_statistics, corpus_bleu, mean_std, paired_interval  # noqa: E402

PLOT = STUDY / MODEL / "quality-against-cost.png"
LORA_MARGIN = 2.0  # a fused row LoRA does not dominate: faster in every round, at most this many BLEU behind

# (what is judged, first row, second row, the bound the interval must clear); the difference is first - second
GOALS = (
    ("S1: the default within 2 BLEU of full fine-tuning", "full", "S1-default", ("high <=", 2.0)),
    ("S2: the default within 6 BLEU of full fine-tuning", "full", "S2-default", ("high <=", 6.0)),
    ("S2: the default ahead of calibrated pruning", "S2-default", "S2-prune", ("low >", 0.0)),
    (
        "S1: healed, then full fine-tuning, within 1 BLEU of full fine-tuning",
        "full",
        "S1-healed",
        ("high <=", 1.0),
    ),
    ("S1: healed, then LoRA, within 1 BLEU of LoRA", "lora", "S1-healed+lora", ("high <=", 1.0)),
)

# the other pairs a user choosing a row asks about: (question, first row, second row), first - second
COMPARISONS = (
    ("full fine-tuning against LoRA on the original", "full", "lora"),
    ("LoRA on the original against the default fine-tuned", "lora", "S1-default"),
    ("the default against calibrated pruning, S1", "S1-default", "S1-prune"),
    ("the default against the paper's data-free fusion", "S1-default", "S1-paper"),
    ("the default fine-tuned against the default with LoRA", "S1-default", "S1-default+lora"),
    ("LoRA on the original against LoRA on the default", "lora", "S1-default+lora"),
    ("healing before full fine-tuning", "S1-healed", "S1-default"),
    ("healing before LoRA", "S1-healed+lora", "S1-default+lora"),
    ("full fine-tuning against the default, S2", "full", "S2-default"),
    ("LoRA on the original against the default fine-tuned, S2", "lora", "S2-default"),
)

INTRO = (
    "The protocol (`benchmarks/study.py`): SmolLM2-135M fine-tuned on 1,000 WebNLG 2017 (triples, text) pairs "
    "drawn at random per seed, stratified by category and triple count (`finetune --sample random`), one epoch, "
    "batch 8, max length 192, matrix products in bfloat16 (`--precision bfloat16`); greedy decoding of at most 96 new tokens, stopping at the end-of-sequence token. "
    "Every choice is made on 300 dev entries drawn the same way (validation, seed 0, at S1: layers 20-29 at "
    "0.5; the S1 choice also holds at S2: layers 10-29 at 0.25): three candidate learning rates per row (1e-4, "
    "3e-4, 1e-3 for rows that train every weight; 3e-4, 1e-3, 3e-3 for LoRA, rank 8 on every linear layer). "
    "Results are measured once, at the chosen rate over three seeds, on 500 entries of the test set's 10 seen "
    "categories, each scored against all its references, every output kept in `benchmarks/results/study/`. "
    "`default`: `mlp-fusion compress` with no recipe flag (calibration texts sampled from the model, half of "
    "each fused width kept), then full fine-tuning; `default+lora`: the same, then LoRA; `prune`: calibrated "
    "pruning on the same sampled texts; `healed`: the default compress with `--heal-steps 300` (healing seeded by the run's seed), then full fine-tuning (`healed+lora`: then LoRA); `paper`: the paper's data-free fusion (one seed, at the default's rate). "
    "Validation runs shared the CPU with other work at times, so their seconds per step are not costs."
)


def validation_table() -> list[str]:
    runs = load_validation()["runs"]
    if not runs:
        return ["No validation run has finished yet."]
    chosen = choices()
    lines = [
        "| row | rate | validation BLEU | chrF | train steps | s / step | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs.values():
        row, rate = run["row"], run["rate"]
        mark = "yes" if chosen.get(row) == rate else ""
        metrics = run["metrics"]
        lines.append(
            f"| {row} | {rate} | {metrics['bleu']:.2f} | {metrics['chrf']:.2f} | {run['train_steps']} | "
            f"{run['seconds_per_step']:.1f} | {mark} |"
        )
    waiting = [name for name in ROWS if name not in chosen and ROWS[name].setting != "S2"]
    if waiting:
        lines.append("")
        lines.append(f"Not yet chosen (validation runs still to come): {', '.join(waiting)}.")
    return lines


def cpu_line() -> str:
    """Which CPUs the validation runs ran on: the header names the first run's machine only, and runs record
    their own CPU only since some runs had already finished."""
    cpus = [run.get("cpu", "not recorded") for run in load_validation()["runs"].values()]
    counts = ", ".join(f"{cpu}: {cpus.count(cpu)}" for cpu in dict.fromkeys(cpus))
    return f"Validation runs by CPU ({counts}); the header below names the machine of the first run."


def test_cpu_line() -> str:
    """Which CPUs the test runs ran on (each run's settings file records it)."""
    cpus = [
        json.loads(path.read_text()).get("cpu", "not recorded")
        for row in ROWS
        for path in sorted((STUDY / MODEL / row).glob("seed*.json"))
    ]
    counts = ", ".join(f"{cpu}: {cpus.count(cpu)}" for cpu in dict.fromkeys(cpus))
    return f"Test runs by CPU ({counts}); their s / step are not costs (other work shared the CPU at times)."


def float32_table() -> list[str]:
    """The first grid, trained in float32 and withdrawn when the study moved to bfloat16 (kept for the
    record: the same inputs and seed, so it shows what the precision changed)."""
    path = validation_file().with_name("validation-float32.json")
    if not path.is_file():
        return []
    runs = json.loads(path.read_text())["runs"]
    lines = [
        "A first grid trained in float32 was withdrawn when the study moved to bfloat16 before any test run (steps "
        '1.4x to 1.7x faster in BENCHMARKS.md, "Training in bfloat16"; less in these runs: compare the '
        "s / step columns); it chose nothing. Its runs, on the same inputs and seed "
        f"(`{path.relative_to(ROOT)}`; runs of more than 10 s per step shared the CPU):",
        "",
        "| row | rate | validation BLEU, float32 | chrF | s / step |",
        "|---|---|---|---|---|",
    ]
    for run in runs.values():
        metrics = run["metrics"]
        lines.append(
            f"| {run['row']} | {run['rate']} | {metrics['bleu']:.2f} | {metrics['chrf']:.2f} | "
            f"{run['seconds_per_step']:.1f} |"
        )
    return lines


def test_statistics() -> dict[str, list]:
    """Each row's per-seed BLEU statistics on the test inputs, seeds in order (rows with test runs only)."""
    lines = (ROOT / DATA / "test.jsonl").read_text().splitlines()
    found = {}
    for row in ROWS:
        files = sorted((STUDY / MODEL / row).glob("seed*.jsonl"))
        runs = []
        for path in files:
            kept = [json.loads(line) for line in path.read_text().splitlines()]
            references = [[lex["text"] for lex in json.loads(lines[k["index"]])["lex"]] for k in kept]
            runs.append(bleu_statistics([k["output"] for k in kept], references))
        if runs:
            found[row] = runs
    return found


def test_lines(found: dict[str, list]) -> list[str]:
    if not found:
        return ["No test runs yet: the test inputs are untouched until every row's rate is chosen."]
    lines = ["| row | seeds | test BLEU (mean ± std) |", "|---|---|---|"]
    for row, runs in found.items():
        mean, std = mean_std([corpus_bleu(stats) for stats in runs])
        spread = (
            f"± {std:.2f}"
            if len(runs) > 1
            else f"(one seed {'by design' if ROWS[row].one_seed else 'so far'})"
        )
        lines.append(f"| {row} | {len(runs)} | {mean:.2f} {spread} |")
    lines += ["", "| goal | difference (95% paired interval) | verdict |", "|---|---|---|"]
    for text, first, second, (side, bound) in GOALS:
        interval = _paired(found, first, second)
        if interval is None:
            lines.append(f"| {text} | - | waits for three seeds of each |")
            continue
        difference, low, high = interval
        met = high <= bound if side == "high <=" else low > bound
        lines.append(
            f"| {text} | {difference:+.2f} ({low:+.2f} to {high:+.2f}) | {'met' if met else 'not met'} |"
        )
    lines += [
        "",
        "Other comparisons (no goal; first row minus second, seeds paired; a one-seed row against the other row's seed 0):",
        "",
        "| comparison | first - second | BLEU difference (95% paired interval) |",
        "|---|---|---|",
    ]
    for text, first, second in COMPARISONS:
        interval = _paired(found, first, second)
        shown = (
            "waits for three seeds of each"
            if interval is None
            else "{:+.2f} ({:+.2f} to {:+.2f})".format(*interval)
        )
        lines.append(f"| {text} | {first} - {second} | {shown} |")
    return lines


def _paired(found: dict[str, list], first: str, second: str) -> tuple[float, float, float] | None:
    """The paired interval of ``first`` minus ``second`` over their common seeds: every seed of each when
    both have three, seed 0 alone when one row has one seed by design (``paper``); None otherwise."""
    one, other = found.get(first, []), found.get(second, [])
    seeds = min(len(one), len(other))
    by_design = seeds == 1 and ROWS[first if len(one) == 1 else second].one_seed
    if seeds < 3 and not by_design:
        return None
    return paired_interval(one[:seeds], other[:seeds])


def cost_lines(found: dict[str, list]) -> list[str]:
    """The rows' costs (median over rounds, with the rounds' range) and the goal that needs them: a fused row
    that LoRA on the original does not dominate."""
    measured = costs()
    if not measured:
        return ["No cost measured yet (`benchmarks/study_cost.py`, after the test runs of seed 0)."]
    lines = [
        "| row | seconds / step (rounds' range) | peak memory MB | trainable parameters | decoding tokens / s (range) |",
        "|---|---|---:|---:|---|",
    ]
    for row, cost in measured.items():
        step, speed = cost["rounds"]["seconds_per_step"], cost["rounds"]["tokens_per_second"]
        lines.append(
            f"| {row} | {cost['seconds_per_step']:.2f} ({min(step):.2f}-{max(step):.2f}) | "
            f"{cost['peak_memory_mb']:.0f} | {cost['trainable_params']:,.0f} | "
            f"{cost['tokens_per_second']:.1f} ({min(speed):.1f}-{max(speed):.1f}) |"
        )
    return [*lines, "", *_lora_goal(found, measured)]


def _lora_goal(found: dict[str, list], measured: dict[str, dict]) -> list[str]:
    """Per fused row with three seeds and costs: faster than LoRA on the original in every round (per step or
    per decoded token), and the upper bound of LoRA's lead at most LORA_MARGIN."""
    lora = measured.get("lora")
    if lora is None or len(found.get("lora", [])) < 3:
        return [
            "- A fused row LoRA on the original does not dominate: waits for LoRA's three seeds and costs."
        ]
    lines, met = [], False
    for row, cost in measured.items():
        if ROWS[row].setting is None or len(found.get(row, [])) < 3:
            continue
        rounds = zip(cost["rounds"]["seconds_per_step"], lora["rounds"]["seconds_per_step"], strict=True)
        faster_step = all(mine < theirs for mine, theirs in rounds)
        rounds = zip(cost["rounds"]["tokens_per_second"], lora["rounds"]["tokens_per_second"], strict=True)
        faster_decoding = all(mine > theirs for mine, theirs in rounds)
        lead, low, high = paired_interval(found["lora"], found[row])
        row_met = (faster_step or faster_decoding) and high <= LORA_MARGIN
        met = met or row_met
        lines.append(
            f"- {row}: faster per step in every round: {faster_step}; faster to decode: {faster_decoding}; "
            f"LoRA's lead {lead:+.2f} BLEU ({low:+.2f} to {high:+.2f}) -> {'not dominated' if row_met else 'dominated'}"
        )
    verdict = "met" if met else "not met"
    return [
        f"- Goal, a fused row LoRA on the original does not dominate (lead at most {LORA_MARGIN} BLEU): {verdict}",
        *lines,
    ]


def plot(found: dict[str, list]) -> None:
    """BLEU (mean over seeds, 95% bootstrap interval) against seconds per step and against decoding speed
    (median over rounds, the rounds' range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = costs()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for row, runs in found.items():
        if row not in measured:
            continue
        bleu, low, high = bleu_interval(runs)
        marker = {None: "s", "S1": "o", "S2": "^"}[ROWS[row].setting]
        for axis, key in zip(axes, ("seconds_per_step", "tokens_per_second"), strict=True):
            values = measured[row]["rounds"][key]
            x = measured[row][key]
            axis.errorbar(
                x, bleu, yerr=[[bleu - low], [high - bleu]], xerr=[[x - min(values)], [max(values) - x]],
                fmt=marker, capsize=3, label=f"{row} (n={len(runs)})",
            )  # fmt: skip
    axes[0].set(
        xlabel="fine-tuning seconds / step (batch 8, CPU)", ylabel="test BLEU (mean over seeds, 95% interval)"
    )
    axes[1].set(
        xlabel="greedy decoding tokens / s (batch 1, CPU)", ylabel="test BLEU (mean over seeds, 95% interval)"
    )
    axes[0].legend(fontsize=7, loc="best")
    figure.suptitle("SmolLM2-135M on WebNLG 2017 (seen categories): quality against cost")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)


def main() -> None:
    record = load_validation()
    found = test_statistics()
    if found and COST.is_file():
        plot(found)
    body = "\n\n".join(
        [
            INTRO,
            "Validation grid (seed 0; s / step as each run went, not a cost: runs above 10 s per step shared the CPU):",
            "\n".join(validation_table()),
            cpu_line(),
            "\n".join(float32_table()),
            "Test:",
            "\n".join(test_lines(found)),
            test_cpu_line(),
            "Costs (`benchmarks/study_cost.py`; nothing else running, the rows taking turns, median of the rounds):",
            "\n".join(cost_lines(found)),
            provenance(record, validation_file(), ROOT),
        ]
    )
    write_section(ROOT / "BENCHMARKS.md", "study-smollm2", body)
    print(body)


if __name__ == "__main__":
    main()

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
from study_statistics import bleu_statistics, corpus_bleu, mean_std, paired_interval  # noqa: E402

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

INTRO = (
    "The protocol (`benchmarks/study.py`): SmolLM2-135M fine-tuned on 1,000 WebNLG 2017 (triples, text) pairs "
    "drawn at random per seed, stratified by category and triple count (`finetune --sample random`), one epoch, "
    "batch 8, max length 192; greedy decoding of at most 96 new tokens, stopping at the end-of-sequence token. "
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
    lines = ["| row | rate | validation BLEU | chrF | train steps | chosen |", "|---|---|---|---|---|---|"]
    for run in runs.values():
        row, rate = run["row"], run["rate"]
        mark = "yes" if chosen.get(row) == rate else ""
        metrics = run["metrics"]
        lines.append(
            f"| {row} | {rate} | {metrics['bleu']:.2f} | {metrics['chrf']:.2f} | {run['train_steps']} | {mark} |"
        )
    waiting = [name for name in ROWS if name not in chosen and ROWS[name].setting != "S2"]
    if waiting:
        lines.append("")
        lines.append(f"Not yet chosen (validation runs still to come): {', '.join(waiting)}.")
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
        lines.append(f"| {row} | {len(runs)} | {mean:.2f} ± {std:.2f} |")
    lines += ["", "| goal | difference (95% paired interval) | verdict |", "|---|---|---|"]
    for text, first, second, (side, bound) in GOALS:
        if len(found.get(first, [])) < 3 or len(found.get(second, [])) < 3:
            lines.append(f"| {text} | - | waits for three seeds of each |")
            continue
        difference, low, high = paired_interval(found[first], found[second])
        met = high <= bound if side == "high <=" else low > bound
        lines.append(
            f"| {text} | {difference:+.2f} ({low:+.2f} to {high:+.2f}) | {'met' if met else 'not met'} |"
        )
    return lines


def main() -> None:
    record = load_validation()
    body = "\n\n".join(
        [
            INTRO,
            "Validation grid (seed 0):",
            "\n".join(validation_table()),
            "Test:",
            "\n".join(test_lines(test_statistics())),
            provenance(record, validation_file(), ROOT),
        ]
    )
    write_section(ROOT / "BENCHMARKS.md", "study-smollm2", body)
    print(body)


if __name__ == "__main__":
    main()

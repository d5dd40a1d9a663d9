"""Recovery after fine-tuning: SmolLM2-135M (or Gemma-3-270M) on WebNLG 2017, full vs LoRA vs fused vs pruned.

Every (row, setting, seed) is one ``mlp-fusion finetune`` process: the first --train (triples, text) pairs,
one epoch, then greedy decoding of the first --eval dev inputs scored against all their references. Rows
are saved to the results file as they finish, and a rerun skips the finished ones, so the benchmark can be
stopped and resumed at will. The seeds go round first (every row's seed 0, then seed 1, ...), so a partial
run already compares every row. ``--curve`` runs the learning-curve rows (one seed, S1, 200 / 1,000 / 4,000
pairs, each row at its best learning rate at 1,000 pairs); ``--speed`` times greedy decoding of each
setting's shapes, the models taking turns; ``--report`` only rewrites BENCHMARKS.md and the plot from the
results file.

    python benchmarks/recovery.py                          # hours on 2 cores; resumable
    python benchmarks/recovery.py --rows full,prune+calibration --seeds 0
    python benchmarks/recovery.py --curve
    python benchmarks/recovery.py --speed
    python benchmarks/recovery.py --model gemma3 --settings S1 --rows full,prune+calibration,"fusion+calibration+keep 0.5"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, run_header  # noqa: E402
from sst2 import run_finetune  # noqa: E402
from webnlg import DATA, LORA, ROWS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}
# per model: its settings (S1: the last third of the layers at 0.5; S2: the last two thirds at 0.25)
MODEL_SETTINGS = {
    "smollm2": {"S1": ("20-29", "0.5"), "S2": ("10-29", "0.25")},
    "gemma3": {"S1": ("12-17", "0.5"), "S2": ("6-17", "0.25")},
}
MODEL = "smollm2"
RESULTS = ROOT / "benchmarks" / "results" / "recovery-smollm2.json"
PLOT = ROOT / "benchmarks" / "results" / "recovery-smollm2.png"
SETTINGS = MODEL_SETTINGS["smollm2"]


def use_model(name: str) -> None:
    """Point the benchmark at ``name``: its settings, results file and plot (one model a run)."""
    global MODEL, RESULTS, PLOT, SETTINGS
    MODEL, SETTINGS = name, MODEL_SETTINGS[name]
    RESULTS = ROOT / "benchmarks" / "results" / f"recovery-{name}.json"
    PLOT = RESULTS.with_suffix(".png")


DEFAULT_ROWS = (
    "full",
    "fusion+calibration+keep 0.5",
    "fusion+calibration+keep 0.5+teacher 0.5",
    "prune+calibration",
    "full+lora",
    "fusion+calibration+keep 0.5+lora",
    "fusion (paper)",
)
# each at its best measured learning rate at 1,000 pairs (full fine-tuning lost 3.5 BLEU at 3e-4)
CURVE_ROWS = ("full", "fusion+calibration+keep 0.5 (lr 3e-4)", "prune+calibration (lr 3e-4)")
CURVE_PAIRS = (200, 1000, 4000)
RECOVERY_ROWS = {
    **ROWS,
    "fusion (paper)": ROWS["fusion"],
    "fusion+calibration+keep 0.5+teacher 0.5": [
        *ROWS["fusion+calibration+keep 0.5"],
        "--teacher-weight",
        "0.5",
    ],
    "fusion+calibration+keep 0.5+lora": [*ROWS["fusion+calibration+keep 0.5"], *LORA],
}
# the learning-rate sweep: the same rows at a higher rate than TRAINING's (the row's own --lr comes last)
SWEPT_ROWS = ("full", "fusion+calibration+keep 0.5", "prune+calibration")
RECOVERY_ROWS.update(
    {f"{row} (lr {lr})": [*RECOVERY_ROWS[row], "--lr", lr] for row in SWEPT_ROWS for lr in ("3e-4", "1e-3")}
)
TRAINING = {"lr": "1e-4", "batch-size": "8", "max-length": "64", "max-new-tokens": "32", "epochs": "1"}


def run_key(row: str, setting: str | None, seed: int, pairs: int) -> str:
    where = f" at {setting}" if setting else ""
    return f"{row}{where} | seed {seed} | {pairs} pairs"


def row_arguments(row: str, setting: str | None, seed: int, pairs: int, evals: int, out: str) -> list[str]:
    fusion = []
    if setting is not None:
        layers, ratio = SETTINGS[setting]
        fusion = ["--layers", layers, "--ratio", ratio]
    training = [part for name, value in TRAINING.items() for part in (f"--{name}", value)]
    # the row's options come last, so that its own learning rate (LoRA rows) wins
    return [
        MODEL, "--task", "webnlg", "--data", str(DATA), "--max-train-samples", str(pairs),
        "--max-eval-samples", str(evals), *fusion, *training, "--seed", str(seed), *RECOVERY_ROWS[row],
        "--out", out,
    ]  # fmt: skip


def planned(rows: list[str], settings: list[str], seeds: list[int], pairs: list[int]) -> list[tuple]:
    """(row, setting or None, seed, pairs): seeds outermost, then pairs, settings and rows."""
    plan = []
    for seed in seeds:
        for count in pairs:
            for setting in settings:
                for row in rows:
                    unfused = row.startswith("full")
                    entry = (row, None if unfused else setting, seed, count)
                    if entry not in plan:
                        plan.append(entry)
    return plan


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"runs": {}, "commands": [], "training": TRAINING}


def save_results(results: dict) -> None:
    """Write the results, first taking in the runs another process finished meanwhile (two queues may share
    the file; each run is written whole by one process)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.exists():
        on_disk = json.loads(RESULTS.read_text())
        results["runs"] = {**on_disk["runs"], **results["runs"]}
        results["commands"] = list(dict.fromkeys([*on_disk["commands"], *results["commands"]]))
    temporary = RESULTS.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(RESULTS)


def run_plan(plan: list[tuple], evals: int, results: dict) -> None:
    for row, setting, seed, pairs in plan:
        key = run_key(row, setting, seed, pairs)
        if key in results["runs"] or key in load_results()["runs"]:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run = run_finetune(row_arguments(row, setting, seed, pairs, evals, f"{tmp}/run"), key)
        run.update(row=row, setting=setting, seed=seed, pairs=pairs, evals=evals, **run_header())
        run["wall_seconds"] = time.perf_counter() - started
        results["runs"][key] = run
        save_results(results)
        print(f"{key}: BLEU {run['metrics']['bleu']:.2f}, chrF {run['metrics']['chrf']:.2f}", flush=True)


def decoding_speed(settings: list[str], tokens: int, rounds: int) -> dict:
    """Greedy batch-1 decoding tokens/s of the original and of each setting's fused and pruned shapes.

    Per-token cost depends on shapes, not on the weights' values, so one untrained model stands for every
    row of the same shape; all models take turns on every prompt."""
    from inference import PROMPTS, decode_seconds

    import mlp_fusion
    from mlp_fusion.loading import load_model

    loaded = load_model(MODEL)
    models = {"original": loaded.model.eval()}
    for setting in settings:
        layers, ratio = SETTINGS[setting]
        for method in ("fusion", "prune"):
            model = load_model(MODEL).model.eval()
            mlp_fusion.fuse(model, mlp_fusion.FusionConfig(method=method, ratio=float(ratio), layers=layers))
            models[f"{method} at {setting}"] = model
    for model in models.values():
        decode_seconds(model, loaded.tokenizer, PROMPTS[0], tokens)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        seconds = dict.fromkeys(models, 0.0)
        for prompt in PROMPTS:
            for name, model in models.items():
                seconds[name] += decode_seconds(model, loaded.tokenizer, prompt, tokens)
        for name in models:
            rates[name].append(len(PROMPTS) * tokens / seconds[name])
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {
        "tokens_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "every_round": rates,
        "params": params,
        "tokens": tokens,
        "rounds": rounds,
        **run_header(),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def shown(values: list[float]) -> str:
    """``mean ± std`` over seeds; the value alone for one seed (no spread measured)."""
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def grouped(runs: dict, pairs: int) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs.values():
        if run["pairs"] == pairs:
            groups.setdefault((run["setting"] or "", run["row"]), []).append(run)
    return dict(sorted(groups.items()))


def speed_of(row: str, setting: str, speed: dict | None) -> float | None:
    if not speed:
        return None
    shape = "original" if not setting else f"{'prune' if row.startswith('prune') else 'fusion'} at {setting}"
    return speed["tokens_per_second"].get(shape)


def table(results: dict, pairs: int) -> list[str]:
    speed = results.get("speed")
    lines = [
        "| setting | row | seeds | BLEU | chrF | s / step | peak MB | parameters | decoding tokens / s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (setting, row), runs in grouped(results["runs"], pairs).items():
        bleu = shown([r["metrics"]["bleu"] for r in runs])
        chrf = shown([r["metrics"]["chrf"] for r in runs])
        step = statistics.mean(r["step_seconds"] / r["train_steps"] for r in runs)
        memory = statistics.mean(r["peak_memory_mb"] for r in runs)
        rate = speed_of(row, setting, speed)
        lines.append(
            f"| {setting or 'unfused'} | {row} | {len(runs)} | {bleu} "
            f"| {chrf} | {step:.2f} | {memory:.0f} | {runs[0]['params']:,} "
            f"| {'' if rate is None else f'{rate:.1f}'} |"
        )
    return lines


def curve_table(results: dict) -> list[str]:
    lines = ["| row | pairs | BLEU | chrF |", "|---|---|---|---|"]
    curve = [r for r in results["runs"].values() if r["seed"] == 0 and r["setting"] in (None, "S1")]
    for run in sorted(curve, key=lambda r: (r["row"], r["pairs"])):
        if run["row"] in CURVE_ROWS:
            lines.append(
                f"| {run['row']} | {run['pairs']} | {run['metrics']['bleu']:.2f} | {run['metrics']['chrf']:.2f} |"
            )
    return lines


def plot(results: dict, pairs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = results.get("speed")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for (setting, row), runs in grouped(results["runs"], pairs).items():
        bleu, spread = mean_std([r["metrics"]["bleu"] for r in runs])
        step = statistics.mean(r["step_seconds"] / r["train_steps"] for r in runs)
        label = f"{row}{f' {setting}' if setting else ''} (n={len(runs)})"
        marker = {"": "s", "S1": "o", "S2": "^"}[setting]
        rate = speed_of(row, setting, speed)
        if rate is not None:
            left.errorbar(rate, bleu, yerr=spread, fmt=marker, capsize=3, label=label)
        right.errorbar(step, bleu, yerr=spread, fmt=marker, capsize=3, label=label)
    left.set(xlabel="greedy decoding tokens / s (batch 1, CPU)", ylabel="BLEU (mean ± std over seeds)")
    right.set(xlabel="optimisation seconds / step (batch 8)", ylabel="BLEU (mean ± std over seeds)")
    right.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"{NAMES[MODEL]} on WebNLG 2017: {pairs} training pairs, one epoch")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)


def report(results: dict, pairs: int, evals: int) -> str:
    intro = (
        f"{NAMES[MODEL]} fine-tuned on WebNLG 2017 ({pairs} training pairs, one epoch, batch 8, lr 1e-4, LoRA "
        f"rows rank 8 at lr 1e-3, rows marked `(lr X)` at lr X, max length 64), then greedy decoding (at most 32 new tokens) of the first "
        f"{evals} dev inputs scored against all their references (sacrebleu BLEU, chrF); mean ± std over "
        f"the seeds run. {'; '.join(f'{name}: layers {layers} at ratio {ratio}' for name, (layers, ratio) in SETTINGS.items())}. "
        "`fusion+calibration+keep "
        "0.5`: fusion calibrated on 128 training inputs, half of each fused width kept as the top-scored "
        "neurons; `+lora`: then LoRA instead of full fine-tuning; `+teacher W`: the training loss mixes the task loss with weight 1 - W and the KL divergence to the unfused model's next-token distribution on every real token with weight W (`--teacher-weight W`); `prune+calibration`: calibrated pruning; `fusion (paper)`: the paper's data-free fusion. "
        "The goals compare each side at its best learning rate measured (full fine-tuning, not LoRA). "
        "Seconds per step and peak memory are the mean over the row's runs; the runs shared the CPU with other "
        "work, so they are indicative only. Decoding speed: greedy batch-1 decoding of each setting's shapes "
        "(untrained models of the same shapes), the models taking turns on every prompt, median round."
    )
    lines = [*table(results, pairs), "", *goal_lines(results, pairs), *speed_goal_lines(results.get("speed"))]
    if any(r["pairs"] != pairs for r in results["runs"].values()):
        lines += [
            "",
            "Learning curve at S1 (seed 0, each row at its best rate at 1,000 pairs):",
            "",
            *curve_table(results),
        ]
    return publish(f"recovery-{MODEL}", intro, lines, results, RESULTS)


GOAL_GAPS = {"S1": 2.0, "S2": 8.0}  # BLEU the best fused row may trail full fine-tuning by
GOAL_SEEDS = 3  # seeds of each row the goals are judged on


def best(bleu: dict, setting: str, chosen) -> tuple | None:
    """(row, (mean, std, seeds)) of the highest-mean row at ``setting`` whose name ``chosen`` accepts."""
    rows = [(row, value) for (where, row), value in bleu.items() if where == setting and chosen(row)]
    return max(rows, key=lambda item: item[1][0]) if rows else None


def goal_lines(results: dict, pairs: int) -> list[str]:
    """Each setting against its goals: the best fused row's gap to full fine-tuning, and its lead over
    calibrated pruning against the larger of their seed standard deviations."""
    groups = grouped(results["runs"], pairs)
    bleu = {
        key: mean_std([r["metrics"]["bleu"] for r in runs]) + (len(runs),) for key, runs in groups.items()
    }
    # each side at its best learning rate: full fine-tuning (not LoRA) and calibrated pruning
    unfused = best(bleu, "", lambda row: row == "full" or row.startswith("full (lr"))
    lines = []
    for setting in SETTINGS:
        fused = best(bleu, setting, lambda row: row.startswith("fusion"))
        pruned = best(bleu, setting, lambda row: row.startswith("prune+calibration"))
        if not fused or not unfused or not pruned:
            continue
        (row, (mean, std, n)), (full_row, full), (prune_row, prune) = fused, unfused, pruned
        spread = max(std, prune[1])
        lead = mean - prune[0]
        gap, seeded = full[0] - mean, min(n, prune[2]) >= GOAL_SEEDS
        undecided = f"undecided before {GOAL_SEEDS} seeds of each"
        within = (
            ("met" if gap <= GOAL_GAPS[setting] else "not met")
            if min(n, full[2]) >= GOAL_SEEDS
            else undecided
        )
        lines.append(
            f"- {setting}: best fused row `{row}` ({n} seed(s)) is {gap:.2f} BLEU below full fine-tuning "
            f"(`{full_row}`, {full[2]} seed(s)): goal within {GOAL_GAPS[setting]:g}, {within}. It is "
            f"{'ahead of' if lead > 0 else 'behind'} calibrated pruning (`{prune_row}`, {prune[2]} seed(s)) by {abs(lead):.2f} "
            + (
                f"against a larger seed std of {spread:.2f}"
                if n > 1 and prune[2] > 1
                else "(one seed: no spread)"
            )
            + ": goal ahead by more than that std, "
            + (("met" if lead > spread else "not met") if seeded else undecided)
            + "."
        )
    return lines


# of the decoding gain the parameter count allows (batch-1 decoding reads every weight once per token)
GOAL_SPEED_SHARE = 0.9


def speed_goal_lines(speed: dict | None) -> list[str]:
    """Each setting's fused decoding speed-up against the one its parameter count allows, and the per-token
    cost that does not scale with parameters (a least-squares line of seconds per token on parameters)."""
    if not speed:
        return []
    rates, params = speed["tokens_per_second"], speed["params"]
    lines = []
    for setting in SETTINGS:
        if (name := f"fusion at {setting}") not in rates:
            continue
        measured, allowed = rates[name] / rates["original"], params["original"] / params[name]
        share = (measured - 1) / (allowed - 1)
        verdict = "met" if share >= GOAL_SPEED_SHARE else "not met"
        lines.append(
            f"- {setting} decoding: fused {measured:.3f}x the original's tokens/s; its parameter count allows "
            f"{allowed:.3f}x. It reaches {share:.0%} of that gain: goal {GOAL_SPEED_SHARE:.0%}, {verdict}."
        )
    names = list(rates)
    slope, fixed = statistics.linear_regression([params[n] for n in names], [1 / rates[n] for n in names])
    original = 1 / rates["original"]
    lines.append(
        f"- Seconds per token against parameters (least squares over the {len(names)} models): "
        f"{fixed * 1e3:.1f} ms per token that no parameter count removes, {fixed / original:.0%} of the "
        f"original's {original * 1e3:.1f} ms; {slope * 1e9:.3f} ms per million parameters."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=MODEL_SETTINGS)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"from: {', '.join(RECOVERY_ROWS)}")
    parser.add_argument(
        "--settings", default="S1,S2", help="S1 (SmolLM2: layers 20-29 at 0.5), S2 (10-29 at 0.25)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=1000, help="training pairs (the first N)")
    parser.add_argument("--eval", type=int, default=200, help="dev inputs decoded and scored (the first N)")
    parser.add_argument("--curve", action="store_true", help="the learning-curve rows instead")
    parser.add_argument("--speed", action="store_true", help="time decoding of each setting's shapes")
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md and the plot")
    args = parser.parse_args()
    use_model(args.model)
    results = load_results()
    command = f"python benchmarks/recovery.py {shlex.join(sys.argv[1:])}".strip()
    if not args.report and command not in results["commands"]:
        results["commands"].append(command)
    settings = args.settings.split(",")
    if args.speed:
        results["speed"] = decoding_speed(settings, tokens=48, rounds=5)
        save_results(results)
    elif args.curve:
        run_plan(planned(list(CURVE_ROWS), ["S1"], [0], list(CURVE_PAIRS)), args.eval, results)
    elif not args.report:
        rows = args.rows.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
        run_plan(planned(rows, settings, seeds, [args.train]), args.eval, results)
    results.update({k: v for k, v in run_header().items() if k != "command"})
    if results["runs"]:
        plot(results, args.train)
        print(report(results, args.train, args.eval))


if __name__ == "__main__":
    main()

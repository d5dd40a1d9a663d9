"""The study protocol every recovery study uses (METHOD.md section 11): every choice on validation inputs,
every result once on test inputs that no choice has seen, every output kept.

- Validation: 300 WebNLG 2017 dev entries, drawn at random, stratified by category and triple count.
- Test: 500 entries of the WebNLG 2017 test set's 10 seen categories, drawn the same way, each scored
  against all its references.
- Training: 1,000 (triples, text) pairs drawn at random per seed (stratified) from the train file, one epoch,
  matrix products in bfloat16 (``finetune --precision bfloat16``: about 1.7x faster steps on this CPU; the
  weights and the optimizer stay float32). A first grid in float32 is kept in ``validation-float32.json``.
- Decoding: greedy, up to 96 new tokens, stopping at the end-of-sequence token, batched.
- Equal tuning: every row gets three candidate learning rates on validation (seed 0, at S1); the S1 winner
  is also the row's rate at S2. A seed changes the training draw, the data order and k-means.
- A test run of a row whose rate is not yet chosen on validation is refused.
- Every test output is kept: ``benchmarks/results/study/<model>/<row>/seed<k>.jsonl`` holds one line per
  test input, ``{"index": i, "output": "..."}`` with ``i`` the entry's 0-based line in ``test.jsonl``, and
  ``seed<k>.json`` beside it the run's settings and costs.

The draws are the product's own (``finetune --sample random``), so a user gets the same samples. Runs are
saved as they finish and a rerun skips them: the study can be stopped and resumed at will.

    python benchmarks/study.py validate                       # the validation grid (hours on 2 cores)
    python benchmarks/study.py validate --rows full,S1-default
    python benchmarks/study.py test --seeds 0,1,2 --settings S1
    python benchmarks/study.py choices                        # the rates chosen so far

Costs (seconds per step, memory, decoding speed) are measured apart, rows taking turns:
``benchmarks/study_cost.py``; ``benchmarks/study_report.py`` writes the section of BENCHMARKS.md and its plot.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, run_cli, run_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("..") / "shared" / "data" / "webnlg2017" / "enriched_v1.6_flat"  # relative to ROOT
STUDY = ROOT / "benchmarks" / "results" / "study"
WORK = Path("out") / "study"  # relative to ROOT: compressed models and run folders (large, not kept)
MODEL = "smollm2"
SETTINGS = {"S1": ("20-29", "0.5"), "S2": ("10-29", "0.25")}
VALIDATION_INPUTS, TEST_INPUTS, TRAIN_PAIRS = 300, 500, 1000
TRAINING = ["--epochs", "1", "--batch-size", "8", "--max-length", "192", "--precision", "bfloat16"]
DECODING = ["--max-new-tokens", "96", "--num-beams", "1"]
FULL_RATES = ("1e-4", "3e-4", "1e-3")  # rows that train every weight
LORA_RATES = ("3e-4", "1e-3", "3e-3")
LORA = ["--peft", "lora", "--lora-rank", "8", "--lora-targets", "all-linear"]
HEALED = ("--heal-steps", "300")  # with --heal-seed following the run's seed


@dataclass(frozen=True)
class Row:
    """One row of the study: what is compressed first (None: the original model is fine-tuned), how it is
    fine-tuned, and its candidate rates; ``tuned_as`` names the row whose chosen rate it takes."""

    name: str
    setting: str | None
    compress: tuple[str, ...] | None
    finetune: tuple[str, ...]
    rates: tuple[str, ...]
    tuned_as: str | None = None

    @property
    def tuning_row(self) -> str:
        """The row whose validation runs choose this row's rate (an S2 row: its S1 counterpart)."""
        name = self.tuned_as or self.name
        return name.replace("S2-", "S1-", 1)

    @property
    def one_seed(self) -> bool:
        """A row run for the record at another row's rate (``paper``) runs seed 0 only."""
        return self.tuned_as is not None


def study_rows() -> dict[str, Row]:
    rows = {
        "full": Row("full", None, None, ("--method", "full"), FULL_RATES),
        "lora": Row("lora", None, None, ("--method", "full", *LORA), LORA_RATES),
    }
    for setting in SETTINGS:
        rows.update(
            {
                # the shipped default exactly as `mlp-fusion compress` makes it without recipe flags
                f"{setting}-default": Row(f"{setting}-default", setting, (), (), FULL_RATES),
                f"{setting}-default+lora": Row(
                    f"{setting}-default+lora", setting, (), tuple(LORA), LORA_RATES
                ),
                # calibrated pruning: the same recipe, so the same sampled texts
                f"{setting}-prune": Row(f"{setting}-prune", setting, ("--method", "prune"), (), FULL_RATES),
                # the default healed at compress time; HEALED's step count is a cost rule (the healing
                # benchmark's last point, within 30 CPU minutes of healing), not a quality choice
                f"{setting}-healed": Row(f"{setting}-healed", setting, HEALED, (), FULL_RATES),
                f"{setting}-healed+lora": Row(
                    f"{setting}-healed+lora", setting, HEALED, tuple(LORA), LORA_RATES
                ),
                # the paper's data-free fusion, for the record: one seed, at the default row's rate
                f"{setting}-paper": Row(
                    f"{setting}-paper", setting, ("--recipe", "paper"), (), FULL_RATES, f"{setting}-default"
                ),
            }
        )
    return rows


ROWS = study_rows()


# ---- the inputs ---------------------------------------------------------------------------------------


@functools.cache
def seen_test_file() -> tuple[Path, list[int]]:
    """The test entries of the seen categories, written to a file of their own, and each one's 0-based line
    in ``test.jsonl`` (so that outputs are kept under the test file's own numbering)."""
    from mlp_fusion.training.data2text import WEBNLG_SEEN

    lines = (ROOT / DATA / "test.jsonl").read_text().splitlines()
    kept = [number for number, line in enumerate(lines) if json.loads(line)["category"] in WEBNLG_SEEN]
    path = WORK / "test-seen.jsonl"
    (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / path).write_text("".join(lines[number] + "\n" for number in kept))
    return path, kept


def data_options(split: str, seed: int, pairs: int = TRAIN_PAIRS, inputs: int | None = None) -> list[str]:
    """The finetune options of a run's data: the seed's training draw of ``pairs``, and the split's evaluation
    draw (``inputs`` of them, by default the split's count)."""
    if split == "validation":
        evaluation = [
            "--eval-file",
            str(DATA / "dev.jsonl"),
            "--max-eval-samples",
            str(inputs or VALIDATION_INPUTS),
        ]
    else:
        evaluation = [
            "--eval-file",
            str(seen_test_file()[0]),
            "--max-eval-samples",
            str(inputs or TEST_INPUTS),
        ]
    return [
        "--task", "webnlg", "--train-file", str(DATA / "train.jsonl"), *evaluation,
        "--max-train-samples", str(pairs), "--sample", "random", "--sample-seed", str(seed),
    ]  # fmt: skip


# ---- running ------------------------------------------------------------------------------------------


def compressed(row: Row, seed: int) -> tuple[str, list[str] | None]:
    """The model a row fine-tunes, compressing it first (once per options and seed) when the row says so;
    and the compress command, for the record."""
    if row.compress is None:
        return MODEL, None
    out, options = model_folder(row, seed)
    command = ["compress", MODEL, *options, "--out", str(out)]
    if not (ROOT / out / "fusion.json").is_file():
        run_cli(command, f"compress {shlex.join(options)}")
    check_same_recipe(ROOT / out, ROOT / model_folder(row, 0)[0])
    return str(out), command


def model_folder(row: Row, seed: int) -> tuple[Path, list[str]]:
    """Where the row's compressed model of ``seed`` is kept (relative to ROOT), and its compress options."""
    layers, ratio = SETTINGS[row.setting]
    heal_seed = ["--heal-seed", str(seed)] if "--heal-steps" in row.compress else []
    options = ["--layers", layers, "--ratio", ratio, *row.compress, "--seed", str(seed), *heal_seed]
    return WORK / "models" / "_".join(part.strip("-").replace("/", "") for part in options), options


# what may differ between a row's seeds; a heal record's "texts" is the number of sampled texts it used
# (seed 2 of S1-healed drew one empty text of 1,000 and healed on 999), not only the number asked for
SEED_DEPENDENT = {"seed", "kl_first", "kl_last", "seconds", "texts"}


def check_same_recipe(made: Path, first: Path) -> None:
    """Stop when a row's model for one seed was made with other settings than its first seed's: compress's
    defaults changed between them, and the row would mix two recipes. Settings recorded on one side only
    (added to the record later) are not compared."""
    if made == first or not (first / "fusion.json").is_file():
        return

    def settings(folder: Path) -> dict:
        record = json.loads((folder / "fusion.json").read_text())
        return {"recipe": record.get("recipe"), "sites": [site.get("settings") for site in record["sites"]]}

    differences = _differences(settings(made), settings(first))
    if differences:
        raise SystemExit(f"{made} was made with other settings than {first}: {'; '.join(differences)}")


def _differences(made: object, first: object, where: str = "") -> list[str]:
    if isinstance(made, dict) and isinstance(first, dict):
        shared = sorted(set(made) & set(first) - SEED_DEPENDENT)
        return [d for key in shared for d in _differences(made[key], first[key], f"{where}.{key}")]
    if isinstance(made, list) and isinstance(first, list) and len(made) == len(first):
        return [d for i, pair in enumerate(zip(made, first)) for d in _differences(*pair, f"{where}[{i}]")]
    return [] if made == first else [f"{where.lstrip('.')} {made!r} against {first!r}"]


def run_folder(row: Row, rate: str, seed: int, split: str) -> Path:
    """Where a run's fine-tuned model and outputs stay (relative to ROOT)."""
    return WORK / "runs" / split / row.name / f"lr{rate}-seed{seed}"


def run(row: Row, rate: str, seed: int, split: str) -> dict:
    """Fine-tune ``row`` at ``rate`` with ``seed`` and score it on ``split``; the result with the commands
    that made it, its settings and costs, and its per-input outputs (test runs)."""
    model, compress_command = compressed(row, seed)
    out = run_folder(row, rate, seed, split)
    command = [
        "finetune", model, *data_options(split, seed), *TRAINING, *DECODING, "--seed", str(seed),
        *row.finetune, "--lr", rate, "--out", str(out), "--overwrite",
    ]  # fmt: skip
    start = time.perf_counter()
    result = run_cli(command, f"{row.name} at lr {rate}, seed {seed}, {split}")
    settings = {
        "row": row.name, "split": split, "rate": rate, "seed": seed, "setting": row.setting,
        "compress_command": None if compress_command is None else shlex.join(compress_command),
        "finetune_command": shlex.join(command), "metrics": result["metrics"],
        "train_steps": result["train_steps"], "seconds_per_step": result["step_seconds"] / result["train_steps"],
        "peak_memory_mb": result["peak_memory_mb"], "trainable_params": result["trainable_params"],
        "params": result["params"], "wall_seconds": time.perf_counter() - start, "cpu": machine()["cpu"],
    }  # fmt: skip
    predictions = [json.loads(line) for line in (ROOT / out / "predictions.jsonl").read_text().splitlines()]
    return {"settings": settings, "predictions": predictions}


# ---- validation: the choices --------------------------------------------------------------------------


def validation_file() -> Path:
    return STUDY / MODEL / "validation.json"


def load_validation() -> dict:
    path = validation_file()
    return json.loads(path.read_text()) if path.is_file() else {**run_header(), "runs": {}}


def validate(rows: list[Row]) -> None:
    """Every tuned row's candidate rates, seed 0, on the validation inputs; each run saved as it ends."""
    for row in rows:
        if row.tuned_as is not None or row.setting == "S2":
            continue  # its rate is another row's choice
        for rate in row.rates:
            record = load_validation()
            key = f"{row.name} | lr {rate}"
            if key in record["runs"]:
                continue
            print(f"validation: {key}", file=sys.stderr, flush=True)
            settings = run(row, rate, 0, "validation")["settings"]
            record = load_validation()  # another process may have added rows meanwhile
            record["runs"][key] = settings
            validation_file().parent.mkdir(parents=True, exist_ok=True)
            validation_file().write_text(json.dumps(record, indent=2) + "\n")


def choices() -> dict[str, str]:
    """Each row's learning rate, for the rows whose candidates have all run on validation: the highest BLEU
    (the first of the candidates on a tie)."""
    runs = load_validation()["runs"]
    chosen = {}
    for row in ROWS.values():
        tuning = ROWS[row.tuning_row]
        scores = [runs.get(f"{tuning.name} | lr {rate}") for rate in tuning.rates]
        if all(scores):
            best = max(range(len(scores)), key=lambda i: (scores[i]["metrics"]["bleu"], -i))
            chosen[row.name] = tuning.rates[best]
    return chosen


# ---- test: the results --------------------------------------------------------------------------------


def test(rows: list[Row], seeds: list[int]) -> None:
    """Every row at its chosen rate, on the test inputs, seeds going round first; refused for a row whose
    rate validation has not chosen yet. The paper rows run seed 0 only."""
    chosen = choices()
    missing = [row.name for row in rows if row.name not in chosen]
    if missing:
        raise SystemExit(
            f"no rate chosen on validation yet for {', '.join(missing)}: run `study.py validate` first"
        )
    _, lines = seen_test_file()
    for seed in seeds:
        for row in rows:
            folder = STUDY / MODEL / row.name
            if (row.one_seed and seed != 0) or (folder / f"seed{seed}.jsonl").is_file():
                continue
            print(f"test: {row.name} seed {seed} at lr {chosen[row.name]}", file=sys.stderr, flush=True)
            done = run(row, chosen[row.name], seed, "test")
            folder.mkdir(parents=True, exist_ok=True)
            kept = [{"index": lines[p["index"]], "output": p["output"]} for p in done["predictions"]]
            (folder / f"seed{seed}.json").write_text(
                json.dumps({**run_header(), **done["settings"]}, indent=2) + "\n"
            )
            (folder / f"seed{seed}.jsonl").write_text("".join(json.dumps(k) + "\n" for k in kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("validate", "test", "choices"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument(
        "--settings", default="S1,S2", help="S1, S2 or both (rows of the original model run once)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="test seeds")
    args = parser.parse_args()
    unknown = [name for name in args.rows.split(",") if name not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    settings = set(args.settings.split(","))
    rows = [ROWS[name] for name in args.rows.split(",") if ROWS[name].setting in (None, *settings)]
    if args.step == "validate":
        validate(rows)
    elif args.step == "test":
        test(rows, [int(seed) for seed in args.seeds.split(",")])
    print(json.dumps(choices(), indent=2))


if __name__ == "__main__":
    main()

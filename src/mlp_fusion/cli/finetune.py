"""``mlp-fusion finetune`` and ``mlp-fusion evaluate``: fine-tune a (fused) classifier on a task, and score it.

The output directory holds ``run.json`` (the settings, written first), ``checkpoints/`` while training, then
the fine-tuned model in the fused format and ``metrics.json``. ``--resume`` continues an interrupted run
from its last checkpoint; the checkpoints are removed once the run is complete.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .common import log

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"  # generation tasks: input, output and references per evaluated input
CHECKPOINTS = "checkpoints"
# settings that must match when a run is resumed
RUN_KEYS = (
    "model", "task", "data", "train_file", "eval_file", "text_column", "text_pair_column", "label_column",
    "source_column", "target_column", "max_new_tokens", "num_beams",
    "method", "ratio", "width", "layers", "n_init", "distill_epochs", "epochs", "lr", "batch_size", "max_length",
    "max_train_samples", "max_eval_samples", "seed", "scheduler", "warmup_ratio", "weight_decay",
)  # fmt: skip


def add_parser(commands) -> None:
    from ..methods import METHODS
    from ..models import BUNDLED, DEFAULT_MODEL
    from ..training.finetune import SCHEDULERS
    from ..training.generation import GENERATION_TASKS
    from ..training.tasks import TASK_NAMES

    finetune = commands.add_parser(
        "finetune", help="fine-tune a fused (or full) model on a classification task"
    )
    finetune.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"base model (hub id, directory, or {', '.join(BUNDLED)}; default {DEFAULT_MODEL}) "
        "or a directory saved by mlp-fusion",
    )
    _task_arguments(finetune, TASK_NAMES + GENERATION_TASKS)
    fusion = finetune.add_argument_group("fusion (for a base model)")
    fusion.add_argument(
        "--method",
        help=f"'full' (no fusion: the baseline) or one of {', '.join(METHODS)} (default fusion)",
    )
    size = fusion.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, help="kept fraction of each fused MLP's width (default 0.25)")
    size.add_argument("--width", type=int, help="new width of every fused MLP")
    fusion.add_argument("--layers", default="all", help="layers to fuse: 'all', '2,3' or '2-5' (default all)")
    fusion.add_argument("--n-init", type=int, default=1, help="k-means restarts (default 1)")
    fusion.add_argument(
        "--distill-epochs",
        type=int,
        default=0,
        help="epochs of layer-wise task-specific tuning against the original model before fine-tuning (default 0)",
    )
    training = finetune.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=3, help="default 3")
    training.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    training.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    training.add_argument("--max-train-samples", type=int, help="train on the first N examples only")
    training.add_argument(
        "--seed", type=int, default=0, help="seed of fusion, head and data order (default 0)"
    )
    training.add_argument("--scheduler", default="linear", choices=SCHEDULERS, help="learning-rate decay")
    training.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps to warm up (0.06)")
    training.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    finetune.add_argument("--out", type=Path, help="output directory (default runs/TASK-METHOD-seedN)")
    run_mode = finetune.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run_mode.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    finetune.set_defaults(
        run=run_finetune, on_interrupt="the same command with --resume continues from the last checkpoint"
    )

    evaluate = commands.add_parser("evaluate", help="score a fine-tuned model on a task's evaluation split")
    evaluate.add_argument(
        "model", help="a directory written by mlp-fusion finetune (or a fine-tuned checkpoint)"
    )
    _task_arguments(evaluate, TASK_NAMES + GENERATION_TASKS)
    evaluate.add_argument(
        "--predictions", type=Path, help="generation tasks: write each output to this JSONL file"
    )
    evaluate.set_defaults(run=run_evaluate)


def _task_arguments(parser: argparse.ArgumentParser, task_names: tuple[str, ...]) -> None:
    group = parser.add_argument_group("task and data")
    group.add_argument("--task", required=True, help=f"one of: {', '.join(task_names)}")
    group.add_argument(
        "--data", type=Path, help="directory with train.tsv and dev.tsv (GLUE format, or .csv/.jsonl)"
    )
    group.add_argument("--train-file", type=Path, help="training file (instead of --data)")
    group.add_argument("--eval-file", type=Path, help="evaluation file (instead of --data)")
    group.add_argument("--text-column", help="csv task: the text column")
    group.add_argument("--text-pair-column", help="csv task: the second text column, for sentence pairs")
    group.add_argument("--label-column", help="csv task: the label column")
    group.add_argument("--source-column", help="text2text task: the input column")
    group.add_argument("--target-column", help="text2text task: the reference column")
    group.add_argument("--max-new-tokens", type=int, default=64, help="generation tasks: longest output (64)")
    group.add_argument("--num-beams", type=int, default=1, help="generation tasks: beam width (1: greedy)")
    group.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples only")
    group.add_argument("--max-length", type=int, default=128, help="longest input in tokens (default 128)")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


@dataclass
class Job:
    """What differs between classification and data-to-text runs; the rest of a run is shared."""

    task: str
    loaded: object  # LoadedModel
    trainer_inputs: dict
    final_scores: Callable  # model -> metrics
    main_metric: str
    greater_is_better: bool
    train_count: int
    eval_count: int
    distill_texts: tuple  # (texts, pairs or None)
    outputs: list = field(default_factory=list)  # generation: one record per evaluated input


def _classification_task(args: argparse.Namespace):
    from ..training.tasks import get_task

    return get_task(
        args.task,
        text_column=args.text_column,
        pair_column=args.text_pair_column,
        label_column=args.label_column,
    )


def _check_decoding(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise UserError("--max-new-tokens and --num-beams must be at least 1")


def _classification_job(args: argparse.Namespace, task, settings) -> Job:
    from ..training.classifier import load_classifier
    from ..training.data import load_task_data
    from ..training.finetune import classification_inputs, evaluate

    data = load_task_data(
        task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    log(f"loading {args.model}")
    loaded = load_classifier(args.model, data.task, seed=args.seed)
    return Job(
        task=data.task.name,
        loaded=loaded,
        trainer_inputs=classification_inputs(data, loaded.tokenizer, settings.max_length),
        final_scores=lambda model: evaluate(
            model, loaded.tokenizer, data, batch_size=settings.batch_size, max_length=settings.max_length
        ),
        main_metric=data.task.main_metric,
        greater_is_better=True,
        train_count=len(data.train),
        eval_count=len(data.evals[""]),
        distill_texts=(data.train.texts, data.train.pairs),
    )


def _generation_job(args: argparse.Namespace, settings) -> Job:
    from ..training.data2text import PROMPT_END
    from ..training.generation import (
        generation_inputs,
        load_causal_lm,
        score_generation,
    )

    _check_decoding(args)
    data = _generation_data(args, need_train=True)
    log(f"loading {args.model}")
    loaded = load_causal_lm(args.model)
    pairs = data.train_pairs()

    def final_scores(model) -> dict:
        metrics, records = score_generation(
            model, loaded.tokenizer, data.eval, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, batch_size=settings.batch_size, max_length=settings.max_length,
        )  # fmt: skip
        job.outputs = records
        return metrics

    job = Job(
        task=args.task,
        loaded=loaded,
        trainer_inputs=generation_inputs(data, loaded.tokenizer, settings.max_length),
        final_scores=final_scores,
        main_metric="loss",
        greater_is_better=False,
        train_count=len(pairs),
        eval_count=len(data.eval),
        distill_texts=([f"{source}{PROMPT_END} {target}" for source, target in pairs], None),
    )
    return job


def _generation_data(args: argparse.Namespace, need_train: bool):
    from ..training.generation import load_generation_data

    if args.text_column or args.text_pair_column or args.label_column:
        raise UserError("--text-column, --text-pair-column and --label-column are for --task csv")
    return load_generation_data(
        args.task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        source_column=args.source_column,
        target_column=args.target_column,
        need_train=need_train,
        max_train_samples=getattr(args, "max_train_samples", None),
        max_eval_samples=args.max_eval_samples,
    )


def run_finetune(args: argparse.Namespace) -> int:
    from ..config import FusionConfig
    from ..fuse import count_parameters, fuse, fusion_records
    from ..models import is_fused, resolve
    from ..training.finetune import TrainSettings, distill_on_task, finetune, training_arguments
    from ..training.generation import GENERATION_TASKS

    # Everything is checked before anything is written.
    generation = args.task in GENERATION_TASKS
    task = None if generation else _classification_task(args)
    settings = TrainSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        scheduler=args.scheduler,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
    )
    path = resolve(args.model)
    fused_input = path is not None and is_fused(path)
    fusion_options = args.ratio or args.width or args.layers != "all" or args.distill_epochs
    if fused_input and (args.method or fusion_options):
        raise UserError(
            f"{args.model} is already fused; --method, --ratio, --width, --layers and --distill-epochs are for a base model"
        )
    method = None if fused_input else (args.method or "fusion")
    config = None
    if method not in (None, "full"):
        config = FusionConfig(
            method=method,
            ratio=args.ratio,
            width=args.width,
            layers=args.layers,
            seed=args.seed,
            n_init=args.n_init,
        )
    elif method == "full" and fusion_options:
        raise UserError(
            "--method full fine-tunes the unfused model: drop --ratio, --width, --layers, --distill-epochs"
        )
    if args.distill_epochs < 0:
        raise UserError(f"--distill-epochs must be at least 0, not {args.distill_epochs}")
    out = args.out or Path("runs") / f"{args.task}-{method or 'fused'}-seed{args.seed}"
    run_record = {key: _plain(getattr(args, key, None)) for key in RUN_KEYS}
    run_record.update(
        model=str(path) if path is not None else args.model, method=method, ratio=config and config.ratio
    )
    checkpoint_dir = out / CHECKPOINTS
    _check_out(out, run_record, args.resume, args.overwrite)
    job = _generation_job(args, settings) if generation else _classification_job(args, task, settings)
    log(f"{job.task}: {job.train_count} training examples, {job.eval_count} for evaluation")
    model = job.loaded.model
    params_before = count_parameters(model)
    original = copy.deepcopy(model) if args.distill_epochs else None
    if config is not None:
        fuse(model, config, progress=log)
    training_args = training_arguments(settings, checkpoint_dir, job.main_metric, job.greater_is_better)
    main = _is_main_process()
    _barrier()  # every process has checked its inputs before the first one writes
    if main:
        _start_out(out, run_record, args.resume, args.overwrite)
    _barrier()
    distilled = None
    if original is not None and not (args.resume and _has_checkpoint(checkpoint_dir)):
        log(f"layer-wise task-specific tuning: {args.distill_epochs} epoch(s)")
        texts, pairs = job.distill_texts
        distilled = distill_on_task(
            original, model, job.loaded.tokenizer, texts, pairs, settings, args.distill_epochs
        )
        log(
            f"hidden-state error {distilled['hidden_state_error_before']:.4f} -> "
            f"{distilled['hidden_state_error_after']:.4f}"
        )
    del original
    outcome = finetune(
        model,
        job.trainer_inputs,
        training_args,
        job.final_scores if main else lambda _: {},
        resume=args.resume,
        progress=main and not args.json,
    )
    if not main:
        return 0
    records = fusion_records(model)
    result = {
        "task": job.task,
        "method": method or ",".join(sorted({r.method for r in records})) or "full",
        "ratio": _mean_ratio(records),
        "metrics": outcome["metrics"],
        "train_seconds": outcome["train_seconds"],
        "train_steps_per_second": outcome["train_steps_per_second"],
        "peak_memory_mb": outcome["peak_memory_mb"],
        "params": count_parameters(model),
        "params_before_fusion": params_before,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_steps": outcome["train_steps"],
        "step_seconds": outcome["step_seconds"],
        "train_examples": job.train_count,
        "epochs": outcome["epochs"],
        "distill": distilled,
        "model": run_record["model"],
        "out": str(out),
    }
    _finish_out(out, model, job.loaded.tokenizer, result, job.outputs)
    _report(result, args.json)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..training.generation import GENERATION_TASKS

    if args.task in GENERATION_TASKS:
        result = _evaluate_generation(args)
    else:
        result = _evaluate_classification(args)
    if args.json:
        print(json.dumps(result))
    else:
        metrics = result["metrics"]
        print(
            f"{result['model']} on {result['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
    return 0


def _evaluate_classification(args: argparse.Namespace) -> dict:
    from ..training.classifier import load_trained_classifier
    from ..training.data import load_task_data
    from ..training.finetune import evaluate

    task = _classification_task(args)
    loaded = load_trained_classifier(args.model)
    config = loaded.model.config
    if task.name == "csv":  # the label names the model was trained with
        from dataclasses import replace

        task = replace(task, labels=tuple(config.id2label[i] for i in range(config.num_labels)))
    elif config.num_labels != task.num_labels:
        raise UserError(
            f"{args.model} predicts {config.num_labels} classes but {task.name} has {task.num_labels}"
        )
    data = load_task_data(
        task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        need_train=False,
        max_eval_samples=args.max_eval_samples,
    )
    metrics = evaluate(loaded.model, loaded.tokenizer, data, max_length=args.max_length)
    examples = {prefix or "main": len(examples) for prefix, examples in data.evals.items()}
    return {"task": task.name, "model": loaded.source, "metrics": metrics, "examples": examples}


def _evaluate_generation(args: argparse.Namespace) -> dict:
    from ..training.generation import load_causal_lm, score_generation

    _check_decoding(args)
    if args.predictions is not None and args.predictions.exists():
        raise UserError(f"{args.predictions} already exists; choose another --predictions file")
    data = _generation_data(args, need_train=False)
    loaded = load_causal_lm(args.model)
    metrics, records = score_generation(
        loaded.model, loaded.tokenizer, data.eval, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, max_length=args.max_length,
    )  # fmt: skip
    if args.predictions is not None:
        _write_jsonl(args.predictions, records)
    return {"task": args.task, "model": loaded.source, "metrics": metrics, "examples": {"main": len(records)}}


def _check_out(out: Path, run_record: dict, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if resume:
        if not (out / RUN_FILE).is_file():
            raise UserError(f"nothing to resume: {out / RUN_FILE} does not exist")
        if (out / METRICS_FILE).is_file():
            raise UserError(f"the run in {out} is complete (it has {METRICS_FILE}); nothing to resume")
        try:
            saved = json.loads((out / RUN_FILE).read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{out / RUN_FILE} is damaged; start again with --overwrite") from None
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run_record.items() if saved.get(k) != v]
        if changed:
            raise UserError(f"--resume needs the settings of the run in {out}; changed: {'; '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        unfinished = (out / RUN_FILE).is_file() and not (out / METRICS_FILE).is_file()
        hint = "pass --resume to continue it, or --overwrite" if unfinished else "pass --overwrite"
        raise UserError(f"{out} already holds {'an unfinished run' if unfinished else 'files'}; {hint}")


def _start_out(out: Path, run_record: dict, resume: bool, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _write_json(out / RUN_FILE, run_record)


def _finish_out(out: Path, model, tokenizer, result: dict, outputs: list[dict]) -> None:
    """Save the model (fused format) next to run.json, the generated outputs, metrics.json; drop the checkpoints."""
    from ..persistence import save_pretrained

    staging = out / f".model-{uuid.uuid4().hex[:8]}"
    save_pretrained(model, staging, tokenizer)
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    if outputs:
        _write_jsonl(out / PREDICTIONS_FILE, outputs)
    _write_json(out / METRICS_FILE, result)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    ratio = f" ratio {result['ratio']:.3g}" if result["ratio"] is not None else ""
    print(
        f"{result['task']} {result['method']}{ratio}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    )
    steps = result["train_steps_per_second"]
    print(
        f"trained {result['train_steps']} steps in {result['train_seconds']:.1f} s"
        + (f" ({steps:.2f} steps/s in the optimisation steps)" if steps else "")
        + f", peak memory {result['peak_memory_mb']:.0f} MB"
    )
    print(
        f"parameters {result['params']:,} ({result['trainable_params']:,} trainable); saved to {result['out']}"
    )


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    os.replace(tmp, path)


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.startswith("checkpoint-") for p in directory.iterdir())


def _mean_ratio(records) -> float | None:
    if not records:
        return None
    return sum(r.width / r.width_before for r in records) / len(records)


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

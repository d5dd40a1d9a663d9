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
from pathlib import Path

from ..errors import UserError
from .common import log

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
# settings that must match when a run is resumed
RUN_KEYS = (
    "model", "task", "data", "train_file", "eval_file", "text_column", "text_pair_column", "label_column",
    "method", "ratio", "width", "layers", "n_init", "distill_epochs", "epochs", "lr", "batch_size", "max_length",
    "max_train_samples", "max_eval_samples", "seed", "scheduler", "warmup_ratio", "weight_decay",
)  # fmt: skip


def add_parser(commands) -> None:
    from ..methods import METHODS
    from ..models import BUNDLED, DEFAULT_MODEL
    from ..training.finetune import SCHEDULERS
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
    _task_arguments(finetune, TASK_NAMES)
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
    _task_arguments(evaluate, TASK_NAMES)
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
    group.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples only")
    group.add_argument("--max-length", type=int, default=128, help="longest input in tokens (default 128)")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def _task(args: argparse.Namespace):
    from ..training.tasks import get_task

    return get_task(
        args.task,
        text_column=args.text_column,
        pair_column=args.text_pair_column,
        label_column=args.label_column,
    )


def run_finetune(args: argparse.Namespace) -> int:
    from ..config import FusionConfig
    from ..fuse import count_parameters, fuse, fusion_records
    from ..models import is_fused, resolve
    from ..training.classifier import load_classifier
    from ..training.data import load_task_data
    from ..training.finetune import TrainSettings, distill_on_task, finetune, training_arguments

    # Everything is checked before anything is written.
    task = _task(args)
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
    if fused_input and (
        args.method or args.ratio or args.width or args.layers != "all" or args.distill_epochs
    ):
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
    elif method == "full" and (args.ratio or args.width or args.layers != "all" or args.distill_epochs):
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
    data = load_task_data(
        task,
        data=args.data,
        train_file=args.train_file,
        eval_file=args.eval_file,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    log(f"{data.task.name}: {len(data.train)} training examples, {len(data.evals[''])} for evaluation")
    log(f"loading {args.model}")
    loaded = load_classifier(args.model, data.task, seed=args.seed)
    model = loaded.model
    params_before = count_parameters(model)
    original = copy.deepcopy(model) if args.distill_epochs else None
    if config is not None:
        fuse(model, config, progress=log)
    training_args = training_arguments(settings, checkpoint_dir, data.task.main_metric)
    main = _is_main_process()
    _barrier()  # every process has checked its inputs before the first one writes
    if main:
        _start_out(out, run_record, args.resume, args.overwrite)
    _barrier()
    distilled = None
    resuming = args.resume and _has_checkpoint(checkpoint_dir)
    if original is not None and not resuming:
        log(f"layer-wise task-specific tuning: {args.distill_epochs} epoch(s)")
        distilled = distill_on_task(
            original, model, loaded.tokenizer, data.train, settings, args.distill_epochs
        )
        log(
            f"hidden-state error {distilled['hidden_state_error_before']:.4f} -> "
            f"{distilled['hidden_state_error_after']:.4f}"
        )
    del original
    outcome = finetune(
        model,
        loaded.tokenizer,
        data,
        training_args,
        settings,
        resume=args.resume,
        progress=main and not args.json,
    )
    if not main:
        return 0
    records = fusion_records(model)
    result = {
        "task": data.task.name,
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
        "train_examples": len(data.train),
        "epochs": outcome["epochs"],
        "distill": distilled,
        "model": run_record["model"],
        "out": str(out),
    }
    _finish_out(out, model, loaded.tokenizer, result)
    _report(result, args.json)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..training.classifier import load_trained_classifier
    from ..training.data import load_task_data
    from ..training.finetune import evaluate

    task = _task(args)
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
    result = {
        "task": task.name,
        "model": loaded.source,
        "metrics": metrics,
        "examples": {prefix or "main": len(examples) for prefix, examples in data.evals.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{loaded.source} on {task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


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


def _finish_out(out: Path, model, tokenizer, result: dict) -> None:
    """Save the model in the fused format next to run.json, then metrics.json, then drop the checkpoints."""
    from ..persistence import save_pretrained

    staging = out / f".model-{uuid.uuid4().hex[:8]}"
    save_pretrained(model, staging, tokenizer)
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
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

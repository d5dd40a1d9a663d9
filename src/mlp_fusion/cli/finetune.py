"""``mlp-fusion finetune``: fuse (or not) a model, optionally distill, fine-tune it on a task, save and report.

Checks every input before it writes anything; the output directory's layout is in ``run_dir.py``, the
task-specific parts in ``jobs.py``. ``--resume`` continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..config import FusionConfig
from ..errors import UserError
from .common import (
    CALIBRATION_OPTIONS,
    add_calibration_options,
    add_config_options,
    add_recipe_option,
    calibration_inputs,
    calibration_texts,
    config_values,
    load_settings,
    log,
)
from .jobs import task_arguments, task_options
from .run_dir import CHECKPOINTS, check_out, finish_out, has_checkpoint, start_out

# TrainSettings fields that finetune takes as options (max_length is a task option, shared with evaluate).
TRAIN_OPTIONS = (
    "epochs", "lr", "batch_size", "seed", "scheduler", "warmup_ratio", "weight_decay", "teacher_weight",
    "teacher_temperature", "precision",
)  # fmt: skip
# FusionConfig fields that finetune takes as options, the size ones first (they exclude each other)
SIZE_OPTIONS = ("ratio", "width", "budget")
FUSION_OPTIONS = (*SIZE_OPTIONS, "layers", "n_init", "keep_fraction", "canonical")


def run_keys() -> tuple[str, ...]:
    """The options a run directory records (a resumed run must repeat them)."""
    from ..training.lora import LoraSettings
    from ..training.tasks import TaskOptions

    return (
        "model", "task", *(f.name for f in fields(TaskOptions)), "method", "recipe", *FUSION_OPTIONS,
        "calibrate", "calibration_samples", *CALIBRATION_OPTIONS, "distill_epochs", "peft",
        *(f.name for f in fields(LoraSettings)), *TRAIN_OPTIONS, "fsdp",
    )  # fmt: skip


def add_parser(commands) -> None:
    from ..loading import BUNDLED, DEFAULT_MODEL, LoadSettings
    from ..methods import METHODS
    from ..training.finetune import TrainSettings
    from ..training.lora import LoraSettings
    from ..training.tasks import TaskOptions

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
    task_arguments(finetune)
    fusion = finetune.add_argument_group("fusion (for a base model)")
    fusion.add_argument(
        "--method",
        help=f"'full' (no fusion: the baseline) or one of {', '.join(METHODS)} (default fusion)",
    )
    size = fusion.add_mutually_exclusive_group()
    add_config_options(size, FusionConfig, SIZE_OPTIONS)
    add_config_options(fusion, FusionConfig, FUSION_OPTIONS[len(SIZE_OPTIONS) :])
    add_calibration_options(fusion, from_file=False)
    add_config_options(fusion, FusionConfig, CALIBRATION_OPTIONS)
    add_recipe_option(fusion)  # after the options whose defaults it hands to the recipe
    fusion.add_argument(
        "--distill-epochs",
        type=int,
        default=0,
        help="epochs of layer-wise task-specific tuning against the original model before fine-tuning (default 0)",
    )
    adapters = finetune.add_argument_group("adapters (through the peft library)")
    adapters.add_argument(
        "--peft",
        choices=("lora",),
        help="train LoRA adapters instead of the whole model (exact on fused projections); the saved model "
        "has them merged",
    )
    add_config_options(adapters, LoraSettings, tuple(f.name for f in fields(LoraSettings)))
    add_config_options(finetune, LoadSettings, ("device",))
    finetune.set_defaults(dtype="float32")  # training keeps float32 weights
    training = finetune.add_argument_group("training")
    add_config_options(training, TaskOptions, ("max_train_samples", "sample_seed"))
    add_config_options(training, TrainSettings, TRAIN_OPTIONS)
    finetune.add_argument("--out", type=Path, help="output directory (default runs/TASK-METHOD-seedN)")
    finetune.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimiser state across the processes (FSDP2); "
        "ends with the last epoch's weights, gathered into one checkpoint",
    )
    run_mode = finetune.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run_mode.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    finetune.set_defaults(
        run=run_finetune, on_interrupt="the same command with --resume continues from the last checkpoint"
    )


@dataclass
class _Plan:
    """What a checked ``finetune`` command will do (nothing is written before it exists)."""

    generation: bool
    settings: object  # TrainSettings
    method: str | None  # None: an already fused model
    config: FusionConfig | None
    recipe: object  # Recipe or None
    calibrate: bool
    lora: object  # LoraSettings or None
    device: object  # torch.device
    out: Path
    run_record: dict
    options: object  # TaskOptions
    source: Path | None  # the model's folder (None: a hub id), which --out may not hold


def run_finetune(args: argparse.Namespace) -> int:
    plan = _check(args)  # everything is checked before anything is written
    check_out(plan.out, plan.run_record, args.resume, args.overwrite, source=plan.source)
    job, params_before, original = _prepare(args, plan)
    outcome, distilled, trainable = _train(args, plan, job, original)
    if outcome is None:
        return 0  # not the main process: it neither writes nor reports
    _finish(args, plan, job, outcome, distilled, params_before, trainable)
    return 0


def _check(args: argparse.Namespace) -> _Plan:
    from ..checkpoint_files import folder_stamp
    from ..loading import is_fused, resolve
    from ..training.finetune import TrainSettings
    from ..training.jobs import check_task

    options = task_options(args)
    generation = check_task(args.task, options)
    settings = TrainSettings(**config_values(args, TrainSettings))
    path = resolve(args.model)
    calibration_texts(args)  # checks the calibration options
    method, config, recipe, calibrate = _fusion(args, path, is_fused(path) if path is not None else False)
    if settings.teacher_weight and (method in (None, "full") or not generation):
        raise UserError(
            "--teacher-weight distils the unfused model into the fused one on a generation task: "
            "it needs a base model, a fusion method and a generation task"
        )
    lora = _lora_settings(args)
    if args.fsdp:
        _check_fsdp(args, lora, settings)
    device = load_settings(args).torch_device()
    if device.index:
        raise UserError(
            f"fine-tuning uses the first visible GPU: run with CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    if args.distill_epochs < 0:
        raise UserError(f"--distill-epochs must be at least 0, not {args.distill_epochs}")
    out = args.out or Path("runs") / f"{args.task}-{method or 'fused'}-seed{args.seed}"
    run_record = {key: _plain(getattr(args, key, None)) for key in run_keys()}
    run_record.update(
        model=str(path) if path is not None else args.model,
        model_files=folder_stamp(path) if path is not None else None,  # a model written again there differs
        method=method,
        ratio=config and config.ratio,
        recipe=recipe and recipe.name,
        keep_fraction=config and config.keep_fraction,
        calibrate=calibrate,
    )
    return _Plan(
        generation, settings, method, config, recipe, calibrate, lora, device, out, run_record, options, path
    )


def _fusion(args: argparse.Namespace, path: Path | None, fused_input: bool):
    """What happens to the model before training: the method (None for an already fused model), its
    config and recipe (None without fusion), and whether the task's inputs calibrate it."""
    from ..recipes import apply_recipe, choose_recipe, source_config

    fusion_options = (
        args.ratio
        or args.width
        or args.budget
        or args.layers != "all"
        or args.distill_epochs
        or args.keep_fraction
        or not args.canonical
        or args.calibrate
    )
    if fused_input and (args.method or fusion_options):
        raise UserError(
            f"{args.model} is already fused; --method, --ratio, --width, --budget, --layers, --keep-fraction, "
            "--no-canonical, --calibrate and --distill-epochs are for a base model"
        )
    method = None if fused_input else (args.method or "fusion")
    config, recipe, calibrate = None, None, args.calibrate
    if method not in (None, "full"):
        recipe = choose_recipe(args.recipe, source_config(args.model, path))
        calibrate = args.calibrate or recipe.calibrate  # the task's inputs calibrate
        config = FusionConfig(**apply_recipe(recipe, {**config_values(args, FusionConfig), "method": method}))
    elif method == "full" and fusion_options:
        raise UserError(
            "--method full fine-tunes the unfused model: drop --ratio, --width, --budget, --layers, "
            "--keep-fraction, --no-canonical, --calibrate, --distill-epochs"
        )
    return method, config, recipe, calibrate


def _prepare(args: argparse.Namespace, plan: _Plan):
    """The task's job (data and model loaded), fused by the plan; the parameter count before fusion, and
    the unfused copy that layer-wise tuning or a teacher needs."""
    from ..fuse import fuse
    from ..recipes import record as record_recipe
    from ..records import count_parameters
    from ..training.jobs import load_job

    settings = plan.settings
    job = load_job(
        args.model, args.task, plan.options, settings, load_settings(args), progress=log, sharded=args.fsdp
    )
    log(f"{job.task}: {job.train_count} training examples, {job.eval_count} for evaluation")
    model = job.loaded.model
    params_before = count_parameters(model)
    original = copy.deepcopy(model) if args.distill_epochs or settings.teacher_weight else None
    if plan.config is not None:
        texts, pairs = job.distill_texts if plan.calibrate else (None, None)
        calibration = calibration_inputs(args, job.loaded.tokenizer, texts, pairs)
        used = len(calibration["input_ids"]) if calibration else 0
        source = {"source": "task", "max_length": args.max_length, "texts": used}
        record_recipe(model, plan.recipe, source if calibration else None, None)
        fuse(model, plan.config, progress=log, calibration=calibration)
    return job, params_before, original


def _train(args: argparse.Namespace, plan: _Plan, job, original):
    """Start the run directory, tune layer-wise if asked, fine-tune. Returns the outcome (None on processes
    other than the main one), the layer-wise tuning's report and the trainable parameter count."""
    from ..training.distill import Teacher
    from ..training.finetune import distill_on_task, finetune, training_arguments
    from ..training.lora import add_lora
    from ..training.sharding import is_main_process

    settings, model, checkpoint_dir = plan.settings, job.loaded.model, plan.out / CHECKPOINTS
    training_args = training_arguments(
        settings, checkpoint_dir, job.main_metric, job.greater_is_better,
        use_cpu=plan.device.type == "cpu", sharded=args.fsdp,
    )  # fmt: skip
    main = is_main_process()
    _barrier()  # every process has checked its inputs before the first one writes
    if main:
        start_out(plan.out, plan.run_record, args.resume, args.overwrite)
    _barrier()
    distilled = None
    if args.distill_epochs and not (args.resume and has_checkpoint(checkpoint_dir)):
        log(f"layer-wise task-specific tuning: {args.distill_epochs} epoch(s)")
        texts, pairs = job.distill_texts
        distilled = distill_on_task(
            original, model, job.loaded.tokenizer, texts, pairs, settings, args.distill_epochs
        )
        log(
            f"hidden-state error {distilled['hidden_state_error_before']:.4f} -> "
            f"{distilled['hidden_state_error_after']:.4f}"
        )
    teacher = None
    if settings.teacher_weight:
        teacher = Teacher(original, settings.teacher_weight, settings.teacher_temperature)
    del original
    lora = plan.lora
    trained = add_lora(model, lora.peft_config(_peft_task(model, plan.generation))) if lora else model
    outcome = finetune(
        trained,
        job.trainer_inputs,
        training_args,
        job.final_scores if main else lambda _: {},
        resume=args.resume,
        progress=main and not args.json,
        teacher=teacher,
        sharded=args.fsdp,
    )
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return (outcome if main else None), distilled, trainable


def _finish(args, plan: _Plan, job, outcome: dict, distilled, params_before: int, trainable: int) -> None:
    """Merge adapters, save the model and the run's files, report."""
    from ..records import count_parameters, fusion_records
    from ..training.lora import merge_lora

    model = merge_lora(outcome["model"]) if plan.lora else outcome["model"]
    records = fusion_records(model)
    result = {
        "task": job.task,
        "method": plan.method or ",".join(sorted({r.method for r in records})) or "full",
        "ratio": _mean_ratio(records),
        "metrics": outcome["metrics"],
        "precision": plan.settings.precision,
        "train_seconds": outcome["train_seconds"],
        "train_steps_per_second": outcome["train_steps_per_second"],
        "peak_memory_mb": outcome["peak_memory_mb"],
        "peak_memory_mb_per_process": outcome["peak_memory_mb_per_process"],
        "process_peak_mb_per_process": outcome["process_peak_mb_per_process"],
        "losses": outcome["losses"],
        "params": count_parameters(model),
        "params_before_fusion": params_before,
        "trainable_params": trainable,
        "train_steps": outcome["train_steps"],
        "step_seconds": outcome["step_seconds"],
        "train_examples": job.train_count,
        "epochs": outcome["epochs"],
        "distill": distilled,
        "model": plan.run_record["model"],
        "out": str(plan.out),
    }
    finish_out(plan.out, model, job.loaded.tokenizer, result, job.outputs)
    _report(result, args.json)


def _check_fsdp(args: argparse.Namespace, lora, settings) -> None:
    from ..training.sharding import check_shardable

    check_shardable()
    held = (("--resume", args.resume), ("--peft", lora), ("--teacher-weight", settings.teacher_weight))
    for option, given in held:
        if given:
            raise UserError(f"--fsdp does not combine with {option} yet")


def _lora_settings(args: argparse.Namespace):
    """The LoRA settings with --peft lora (peft installed), None without; LoRA options alone are refused."""
    from ..training.lora import LoraSettings, require_peft

    values = config_values(args, LoraSettings)
    if args.peft is None:
        defaults = asdict(LoraSettings())
        changed = [name for name, value in values.items() if value != defaults[name]]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} sets up LoRA: add --peft lora")
        return None
    require_peft()
    return LoraSettings(**values)


def _peft_task(model, generation: bool) -> str:
    if not generation:
        return "SEQ_CLS"  # PEFT then also trains the new classification head
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


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


def _mean_ratio(records) -> float | None:
    if not records:
        return None
    return sum(r.width / r.width_before for r in records) / len(records)


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

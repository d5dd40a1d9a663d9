"""``mlp-fusion finetune``: parse the options and call :func:`mlp_fusion.training.finetune_run.finetune`,
which checks every input, fuses, trains and saves the run; report its result.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from ..config import CALIBRATION_FIELDS, FusionConfig
from ..errors import UserError
from .common import (
    add_calibration_options,
    add_config_options,
    add_recipe_option,
    config_values,
    log,
)
from .jobs import task_arguments, task_options


def add_parser(commands) -> None:
    from ..loading import BUNDLED, DEFAULT_MODEL, LoadSettings
    from ..methods import METHODS
    from ..training.finetune import TrainSettings
    from ..training.finetune_run import FUSION_FIELDS, SIZE_FIELDS, TRAIN_FIELDS
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
    add_config_options(size, FusionConfig, SIZE_FIELDS)
    add_config_options(fusion, FusionConfig, FUSION_FIELDS[len(SIZE_FIELDS) :])
    add_calibration_options(fusion, from_file=False)
    add_config_options(fusion, FusionConfig, CALIBRATION_FIELDS)
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
    add_config_options(training, TrainSettings, TRAIN_FIELDS)
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


def run_finetune(args: argparse.Namespace) -> int:
    from ..training.finetune import TrainSettings
    from ..training.finetune_run import FUSION_FIELDS, finetune

    result = finetune(
        args.model, args.task, args.out,
        options=task_options(args), train=TrainSettings(**config_values(args, TrainSettings)),
        method=args.method, recipe=args.recipe, calibrate=args.calibrate,
        calibration_samples=args.calibration_samples, distill_epochs=args.distill_epochs,
        lora=_lora_settings(args), device=args.device, resume=args.resume, overwrite=args.overwrite,
        sharded=args.fsdp, progress=log, progress_bar=not args.json,
        **{name: getattr(args, name) for name in (*FUSION_FIELDS, *CALIBRATION_FIELDS)},
    )  # fmt: skip
    if result is not None:  # None: not the main process, which neither writes nor reports
        _report(result, args.json)
    return 0


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

"""``finetune(model, task, out, ...)``: fuse (or not) a model, optionally tune it layer-wise, fine-tune it on a
task, and save the run: the library verb behind ``mlp-fusion finetune``.

Every input is checked before anything is written; the run folder's layout is in :mod:`.run_dir`.
``resume=True`` continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..compression import check_choices
from ..config import CALIBRATION_FIELDS, FusionConfig, check_field_names
from ..errors import UserError, check_given
from ..loading import DEFAULT_MODEL, LoadSettings
from .finetune import TrainSettings
from .lora import LoraSettings
from .run_dir import CHECKPOINTS, check_out, finish_out, has_checkpoint, start_out
from .tasks import TaskOptions

# the TrainSettings fields a run records (max_length is a task option, shared with evaluation)
TRAIN_FIELDS = (
    "epochs", "lr", "batch_size", "seed", "scheduler", "warmup_ratio", "weight_decay", "teacher_weight",
    "teacher_temperature", "precision",
)  # fmt: skip
# the FusionConfig fields a run takes besides CALIBRATION_FIELDS, the size ones first (they exclude each other)
SIZE_FIELDS = ("ratio", "width", "budget")
FUSION_FIELDS = (*SIZE_FIELDS, "layers", "n_init", "keep_fraction", "canonical")


@dataclass
class _Plan:
    """What a checked run will do (nothing is written before it exists)."""

    model: str
    task: str
    options: TaskOptions
    settings: TrainSettings
    method: str | None  # None: an already fused model
    config: FusionConfig | None
    recipe: object  # Recipe or None
    calibrate: bool
    calibration_samples: int
    distill_epochs: int
    lora: LoraSettings | None
    device: str
    sharded: bool
    out: Path
    run_record: dict  # what run.json keeps
    generation: bool
    source: Path | None  # the model's folder (None: a hub id), which ``out`` may not hold


def finetune(
    model: str | Path = DEFAULT_MODEL,
    task: str = "sst2",
    out: str | Path | None = None,
    *,
    options: TaskOptions | None = None,
    train: TrainSettings | None = None,
    method: str | None = None,
    recipe: str = "auto",
    calibrate: bool = False,
    calibration_samples: int = 128,
    distill_epochs: int = 0,
    lora: LoraSettings | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    sharded: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool = True,
    **fusion_fields,
) -> dict | None:
    """Fine-tune ``model`` (a bundled alias, directory or hub id) on ``task`` and save the run to ``out``
    (default ``runs/TASK-METHOD-seedN``): ``run.json`` first, checkpoints while training, then the model in
    the fused format, ``metrics.json`` and, for generation tasks, ``predictions.jsonl``.

    ``options`` says where the task's data is and how much of it to use; ``train`` how to train (its
    ``max_length`` is ``options``'); ``method`` is ``"full"`` (no fusion), a method of
    :data:`~mlp_fusion.METHODS`, or None (fusion for a base model; nothing more for a fused one), and the
    FusionConfig fields (``ratio=0.5, layers="20-29"``) its size, with ``recipe`` filling in the rest.
    ``calibrate`` calibrates the fusion on the task's training inputs (the recipe may ask for it too);
    ``distill_epochs`` tunes the fused layers toward the original's first; ``lora`` trains adapters instead
    of the weights (merged in the saved model). Returns the run's result (as ``metrics.json`` holds it), or
    None on a process other than the main one under ``sharded`` training.
    """
    say = progress or (lambda message: None)
    check_given(
        (options, TaskOptions, "options"), (train, TrainSettings, "train"), (lora, LoraSettings, "lora")
    )
    plan = _check(
        str(model), task, out, options or TaskOptions(), train or TrainSettings(), method, recipe, calibrate,
        calibration_samples, distill_epochs, lora, device, sharded, resume, fusion_fields,
    )  # fmt: skip
    check_out(plan.out, plan.run_record, resume, overwrite, source=plan.source)
    job, params_before, original = _prepare(plan, say)
    outcome, distilled, trainable = _train(plan, job, original, resume, overwrite, progress_bar, say)
    if outcome is None:
        return None  # not the main process: it neither writes nor reports
    return _finish(plan, job, outcome, distilled, params_before, trainable)


def _check(
    model, task, out, options, settings, method, recipe, calibrate, calibration_samples, distill_epochs, lora,
    device, sharded, resume, fusion_fields,
) -> _Plan:  # fmt: skip
    from ..loading import is_fused, resolve
    from .jobs import check_task

    generation = check_task(task, options)
    settings = replace(settings, max_length=options.max_length)
    path = resolve(model)
    if calibration_samples < 1 or options.max_length < 1:
        raise UserError("--calibration-samples and --max-length must be at least 1")
    fusion = _fusion_fields(fusion_fields, settings.seed)
    method, config, chosen, calibrate = _fusion(
        model, path, path is not None and is_fused(path), method, recipe, calibrate, distill_epochs, fusion
    )
    if config is not None and path is not None:
        check_choices(path, config)  # before the model and the data are loaded
    if settings.teacher_weight and (method in (None, "full") or not generation):
        raise UserError(
            "--teacher-weight distils the unfused model into the fused one on a generation task: "
            "it needs a base model, a fusion method and a generation task"
        )
    if sharded:
        _check_sharded(lora, settings, resume)
    index = LoadSettings(device=device).torch_device().index
    if index:
        raise UserError(
            f"fine-tuning uses the first visible GPU: run with CUDA_VISIBLE_DEVICES={index} and --device cuda"
        )
    if distill_epochs < 0:
        raise UserError(f"--distill-epochs must be at least 0, not {distill_epochs}")
    out = Path(out) if out is not None else Path("runs") / f"{task}-{method or 'fused'}-seed{settings.seed}"
    plan = _Plan(
        model, task, options, settings, method, config, chosen, calibrate, calibration_samples, distill_epochs,
        lora, device, sharded, out, {}, generation, path,
    )  # fmt: skip
    plan.run_record = _run_record(plan, fusion)
    return plan


def _run_record(plan: _Plan, fusion: dict) -> dict:
    """The settings ``run.json`` keeps, which a resumed run must repeat, and a stamp of the model's files."""
    from ..checkpoint_files import folder_stamp

    config, path = plan.config, plan.source
    return {
        "model": str(path) if path is not None else plan.model,
        "task": plan.task,
        **{name: _plain(value) for name, value in asdict(plan.options).items()},
        "method": plan.method,
        "recipe": plan.recipe and plan.recipe.name,
        **{name: fusion[name] for name in FUSION_FIELDS},
        "ratio": config and config.ratio,
        "keep_fraction": config and config.keep_fraction,
        "calibrate": plan.calibrate,
        "calibration_samples": plan.calibration_samples,
        **{name: fusion[name] for name in CALIBRATION_FIELDS},
        "distill_epochs": plan.distill_epochs,
        "peft": "lora" if plan.lora else None,
        **asdict(plan.lora or LoraSettings()),
        **{name: getattr(plan.settings, name) for name in TRAIN_FIELDS},
        "fsdp": plan.sharded,
        "model_files": None if path is None else folder_stamp(path),  # a model written again there differs
    }


def _fusion_fields(given: dict, seed: int) -> dict:
    """Every FusionConfig field a run takes: those ``given``, the rest at their defaults (None for the
    recipe's fields, which the recipe fills in); k-means takes the training seed unless one is given."""
    check_field_names(given)
    return {**_fusion_defaults(), "seed": seed, **given}


def _fusion_defaults() -> dict:
    """FusionConfig's defaults, None for the recipe's fields (the recipe fills them in)."""
    from ..recipes import RECIPE_FIELDS

    return {
        f.name: None if f.name in RECIPE_FIELDS else f.default
        for f in fields(FusionConfig)
        if f.name != "method"
    }


def _fusion(model, path, fused_input: bool, method, recipe, calibrate, distill_epochs, fusion: dict):
    """What happens to the model before training: the method (None for an already fused model), its
    config and recipe (None without fusion), and whether the task's inputs calibrate it."""
    from ..recipes import apply_recipe, choose_recipe, source_config

    defaults = _fusion_defaults()
    changed = [name for name in (*FUSION_FIELDS, *CALIBRATION_FIELDS) if fusion[name] != defaults[name]]
    changed += ["calibrate"] * calibrate + ["distill_epochs"] * bool(distill_epochs)
    if fused_input and (method or changed):
        named = ", ".join(_option(name) for name in changed) or f"--method {method}"
        raise UserError(f"{model} is already fused; leave out {named}, which set up fusing a base model")
    method = None if fused_input else (method or "fusion")
    if method == "full" and changed:
        raise UserError(
            f"--method full fine-tunes the unfused model: drop {', '.join(_option(name) for name in changed)}"
        )
    if method in (None, "full"):
        return method, None, None, calibrate
    chosen = choose_recipe(recipe, source_config(model, path))
    config = FusionConfig(**apply_recipe(chosen, {**fusion, "method": method}))
    return method, config, chosen, calibrate or chosen.calibrate  # the task's inputs calibrate


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _prepare(plan: _Plan, say):
    """The task's job (data and model loaded), fused by the plan; the parameter count before fusion, and
    the unfused copy that layer-wise tuning or a teacher needs."""
    from ..calibration import first_calibration_batch
    from ..fuse import fuse
    from ..recipes import record as record_recipe
    from ..records import count_parameters
    from .jobs import load_job

    load = LoadSettings(dtype="float32", device=plan.device)  # training keeps float32 weights
    job = load_job(
        plan.model, plan.task, plan.options, plan.settings, load, progress=say, sharded=plan.sharded
    )
    say(f"{job.task}: {job.train_count} training examples, {job.eval_count} for evaluation")
    model = job.loaded.model
    params_before = count_parameters(model)
    original = copy.deepcopy(model) if plan.distill_epochs or plan.settings.teacher_weight else None
    if plan.config is not None:
        texts, pairs = job.distill_texts if plan.calibrate else (None, None)
        count, length = plan.calibration_samples, plan.settings.max_length
        calibration = first_calibration_batch(job.loaded.tokenizer, texts, pairs, count, length)
        used = len(calibration["input_ids"]) if calibration else 0
        source = {"source": "task", "max_length": plan.settings.max_length, "texts": used}
        record_recipe(model, plan.recipe, source if calibration else None, None)
        fuse(model, plan.config, progress=say, calibration=calibration)
    return job, params_before, original


def _train(plan: _Plan, job, original, resume: bool, overwrite: bool, progress_bar: bool, say):
    """Start the run directory, tune layer-wise if asked, fine-tune. Returns the outcome (None on processes
    other than the main one), the layer-wise tuning's report and the trainable parameter count."""
    from .distill import Teacher
    from .finetune import distill_on_task, finetune, training_arguments
    from .lora import add_lora
    from .sharding import is_main_process

    settings, model, checkpoint_dir = plan.settings, job.loaded.model, plan.out / CHECKPOINTS
    training_args = training_arguments(
        settings, checkpoint_dir, job.main_metric, job.greater_is_better,
        use_cpu=LoadSettings(device=plan.device).torch_device().type == "cpu", sharded=plan.sharded,
    )  # fmt: skip
    main = is_main_process()
    _barrier()  # every process has checked its inputs before the first one writes
    if main:
        start_out(plan.out, plan.run_record, resume, overwrite)
    _barrier()
    distilled = None
    if plan.distill_epochs and not (resume and has_checkpoint(checkpoint_dir)):
        say(f"layer-wise task-specific tuning: {plan.distill_epochs} epoch(s)")
        texts, pairs = job.distill_texts
        distilled = distill_on_task(
            original, model, job.loaded.tokenizer, texts, pairs, settings, plan.distill_epochs
        )
        say(
            f"hidden-state error {distilled['hidden_state_error_before']:.4f} -> "
            f"{distilled['hidden_state_error_after']:.4f}"
        )
    teacher = None
    if settings.teacher_weight:
        teacher = Teacher(original, settings.teacher_weight, settings.teacher_temperature)
    del original
    trained = (
        add_lora(model, plan.lora.peft_config(_peft_task(model, plan.generation))) if plan.lora else model
    )
    outcome = finetune(
        trained,
        job.trainer_inputs,
        training_args,
        job.final_scores if main else lambda _: {},
        resume=resume,
        progress=main and progress_bar,
        teacher=teacher,
        sharded=plan.sharded,
    )
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return (outcome if main else None), distilled, trainable


def _finish(plan: _Plan, job, outcome: dict, distilled, params_before: int, trainable: int) -> dict:
    """Merge adapters, save the model and the run's files; the result."""
    from ..records import count_parameters, fusion_records
    from .lora import merge_lora

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
    return result


def _check_sharded(lora, settings: TrainSettings, resume: bool) -> None:
    from .sharding import check_shardable

    check_shardable()
    held = (("--resume", resume), ("--peft", lora), ("--teacher-weight", settings.teacher_weight))
    for option, given in held:
        if given:
            raise UserError(f"--fsdp does not combine with {option} yet")


def _peft_task(model, generation: bool) -> str:
    if not generation:
        return "SEQ_CLS"  # PEFT then also trains the new classification head
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


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

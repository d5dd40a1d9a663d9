"""Fine-tuning and scoring a (fused) sequence classifier with the Hugging Face ``Trainer``.

AdamW with linear or polynomial decay after a warm-up, dynamic padding, an evaluation and a checkpoint
every epoch, the best epoch's weights kept, resumable from the last checkpoint, distributed data parallel
when launched with ``torchrun`` / ``accelerate launch``, or fully sharded across those processes
(:mod:`mlp_fusion.training.sharding`). Fixed scales are buffers, so the optimiser never sees them.
"""

from __future__ import annotations

import itertools
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from ..batches import model_inputs
from ..errors import UserError
from . import sharding
from .data import EncodedDataset, TaskData
from .distill import Teacher, distill
from .metrics import score
from .peak_memory import PeakMemory
from .precision import PRECISIONS, check_device_precision, check_precision

SCHEDULERS = ("linear", "polynomial")


@dataclass
class TrainSettings:
    """Hyper-parameters of one fine-tuning run (defaults: the paper's optimiser settings, 3 epochs)."""

    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=32, metadata={"help": "examples per step and process"})
    max_length: int = 128  # a task option: the longest input in tokens
    seed: int = field(default=0, metadata={"help": "seed of fusion, head and data order"})
    scheduler: str = field(
        default="linear", metadata={"help": f"learning-rate decay: {' or '.join(SCHEDULERS)}"}
    )
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of steps to warm up"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    teacher_weight: float = field(
        default=0.0,
        metadata={
            "help": "generation tasks on a fused base model: weight of the KL divergence to the unfused "
            "model's next-token distribution in the training loss (0: task loss only)"
        },
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of that KL divergence"}
    )
    precision: str = field(
        default="float32",
        metadata={
            "help": "the precision of the matrix products while training: 'bfloat16' (autocast; the weights, "
            "their gradients and the optimizer stay float32, and the final scores are computed in float32) "
            "or 'float32'",
            "choices": PRECISIONS,
        },
    )

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}"),
            (math.isfinite(self.lr) and self.lr > 0, f"the learning rate must be positive, not {self.lr}"),
            (self.batch_size >= 1, f"the batch size must be at least 1, not {self.batch_size}"),
            (self.max_length >= 2, f"max length must be at least 2 tokens, not {self.max_length}"),
            (
                self.scheduler in SCHEDULERS,
                f"unknown scheduler {self.scheduler!r}: use {' or '.join(SCHEDULERS)}",
            ),
            (0 <= self.warmup_ratio < 1, f"the warm-up ratio must be in [0, 1), not {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight decay must be at least 0, not {self.weight_decay}"),
            (
                0 <= self.teacher_weight <= 1,
                f"the teacher weight must be in [0, 1], not {self.teacher_weight}",
            ),
            (
                self.teacher_temperature > 0,
                f"the teacher temperature must be above 0, not {self.teacher_temperature}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        check_precision(self.precision, "--precision")

    def to_dict(self) -> dict:
        return asdict(self)


def training_arguments(
    settings: TrainSettings,
    checkpoint_dir: Path,
    main_metric: str,
    greater_is_better: bool = True,
    *,
    use_cpu: bool = False,
    sharded: bool = False,
):
    """The Trainer's arguments; making them also joins the process group under torchrun. A sharded run
    keeps no epoch checkpoints (it ends with the last epoch's weights, gathered)."""
    check_device_precision(settings.precision, torch.device("cpu" if use_cpu else "cuda"), "--precision")
    return transformers.TrainingArguments(
        output_dir=str(checkpoint_dir),
        bf16=settings.precision == "bfloat16",
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        adam_beta2=settings.adam_beta2,
        adam_epsilon=settings.adam_epsilon,
        eval_strategy="epoch",
        save_strategy="no" if sharded else "epoch",
        save_total_limit=1,
        load_best_model_at_end=not sharded,
        metric_for_best_model=main_metric,
        greater_is_better=greater_is_better,
        logging_steps=1,  # every step's loss is kept in the run's record
        seed=settings.seed,
        use_cpu=use_cpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_backend="gloo" if sharding.world_size() > 1 and not torch.cuda.is_available() else None,
    )


def classification_inputs(data: TaskData, tokenizer, max_length: int) -> dict:
    """The Trainer's datasets, collator and per-epoch metrics for a classification task."""
    if data.train is None:
        raise UserError("fine-tuning needs a training split")
    return {
        "train_dataset": EncodedDataset(data.train, tokenizer, max_length),
        "eval_dataset": EncodedDataset(data.evals[""], tokenizer, max_length),
        "data_collator": transformers.DataCollatorWithPadding(tokenizer),
        "compute_metrics": lambda p: score(data.task.metrics, p.predictions, p.label_ids),
    }


def finetune(
    model: nn.Module,
    trainer_inputs: dict,
    args: transformers.TrainingArguments,
    final_scores: Callable[[nn.Module], dict],
    *,
    resume: bool = False,
    progress: bool = True,
    teacher: Teacher | None = None,
    sharded: bool = False,
) -> dict:
    """Fine-tune ``model``; returns ``final_scores`` of the best epoch's weights, the run's cost, every
    step's training loss, and the trained ``model``.

    With a ``teacher``, the training loss mixes the task loss with the KL divergence to the teacher's
    next-token distribution (its forward pass is part of every step's time). ``sharded`` (under torchrun,
    with ``args`` made with ``sharded=True``) splits the model across the processes with FSDP2; the
    returned model is then the gathered one on the main process and None on the others."""
    timer = _Progress(progress)
    trainer_class = transformers.Trainer if teacher is None else _TeacherTrainer
    if sharded:
        plain = sharding.prepare(model)
    trainer = trainer_class(model=model, args=args, callbacks=[timer], **trainer_inputs)
    if _classifier(model):
        # Its loss is the mean over its own process's examples; the Trainer would otherwise scale it by the
        # number of processes (meant for token sums divided by a global count), doubling the gradients and
        # the logged loss of a two-process run.
        trainer.model_accepts_loss_kwargs = False
    if sharded:
        sharding.keep_sharded(trainer)
    if teacher is not None:
        trainer.teacher = teacher
        teacher.model.to(args.device)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    last = transformers.trainer_utils.get_last_checkpoint(args.output_dir) if resume else None
    if resume and last is None:
        print("no checkpoint yet: starting from the beginning", file=sys.stderr)
    start = time.perf_counter()
    with PeakMemory() as peak:
        trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    trained = trainer.model
    if sharded:
        trained = sharding.gather(trainer.model, plain)
        trained = trained.to(args.device) if trained is not None else None
    return {
        "metrics": final_scores(trained.eval()) if trained is not None else {},
        "model": trained,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "epochs": [
            {k.removeprefix("eval_"): v for k, v in entry.items() if k not in ("step",)}
            for entry in trainer.state.log_history
            if "eval_loss" in entry
        ],
        "train_seconds": seconds,
        "train_steps": trainer.state.global_step,
        "step_seconds": timer.step_seconds,
        "train_steps_per_second": timer.steps / timer.step_seconds if timer.step_seconds else None,
        "peak_memory_mb": peak.mb,
        "peak_memory_mb_per_process": _per_process(peak.mb),
        # loading and fusing included: what a process needed over its whole life so far (Linux: KiB)
        "process_peak_mb_per_process": _per_process(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }


def _classifier(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForSequenceClassification")


def _per_process(value: float) -> list[float]:
    """``value`` of every process, in rank order (every process must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def evaluate(
    model: nn.Module, tokenizer, data: TaskData, *, batch_size: int = 64, max_length: int = 128
) -> dict[str, float]:
    """The task's metrics on every evaluation split (MNLI: matched, then ``mismatched_``-prefixed)."""
    collate = transformers.DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    metrics = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prefix, examples in data.evals.items():
            dataset = EncodedDataset(examples, tokenizer, max_length)
            logits = []
            for start in range(0, len(dataset), batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch.pop("labels")
                inputs = {k: v.to(device) for k, v in batch.items()}
                logits.append(model(**inputs).logits.float().cpu())
            metrics.update(score(data.task.metrics, torch.cat(logits).numpy(), examples.labels, prefix))
    model.train(was_training)
    return metrics


def distill_on_task(
    original: nn.Module,
    fused: nn.Module,
    tokenizer,
    texts: list[str],
    pairs: list[str] | None,
    settings: TrainSettings,
    epochs: int,
) -> dict:
    """Layer-wise task-specific tuning on the training inputs (labels unused), at the fine-tuning rate."""
    batches = []
    for start in range(0, len(texts), settings.batch_size):
        end = start + settings.batch_size
        encoded = tokenizer(
            texts[start:end],
            pairs[start:end] if pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=settings.max_length,
            return_tensors="pt",
        )
        batches.append(model_inputs(fused, dict(encoded)))
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    report = distill(original, fused, batches, epochs=epochs, lr=settings.lr, progress=_every(len(batches)))
    return {
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
        "hidden_state_error_before": report["before"],
        "hidden_state_error_after": report["after"],
    }


def _every(steps: int):
    """Progress that prints every 20th step's line and each epoch's last."""
    calls = itertools.count(1)

    def show(message: str) -> None:
        call = next(calls)
        if call % 20 == 0 or call % steps == 0:
            print(message, file=sys.stderr, flush=True)

    return show


class _TeacherTrainer(transformers.Trainer):
    """The Trainer with the teacher's mixed loss in training; evaluation keeps the plain task loss."""

    teacher: Teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self.teacher.loss(model, inputs)
        return (loss, outputs) if return_outputs else loss


class _Progress(transformers.TrainerCallback):
    """A progress bar on stderr (stdout stays for --json), and the time spent in optimisation steps."""

    def __init__(self, show: bool):
        self.show = show
        self.bar = None
        self.steps = 0
        self.step_seconds = 0.0
        self._started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="fine-tuning",
                unit="step",
                file=sys.stderr,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds += time.perf_counter() - self._started
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None and metrics:
            shown = ", ".join(
                f"{k.removeprefix('eval_')} {v:.4f}"
                for k, v in metrics.items()
                if k != "epoch" and "runtime" not in k and "per_second" not in k
            )
            self.bar.write(f"epoch {state.epoch:.0f}: {shown}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

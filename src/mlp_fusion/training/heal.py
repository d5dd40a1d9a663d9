"""Healing: after compression, train the compressed model toward the original model's next-token
distributions, once, before any task (as Minitron and Sheared-LLaMA distil a pruned model on generic text).

The original is the frozen teacher; both models run in eval mode (no dropout), and the loss is the KL
divergence from the teacher's next-token distribution to the student's over every real token, with AdamW at
a constant rate or one that falls linearly to 0. The texts need no data set: by default they are sampled
from the original model (seeded), or they are the user's own. The fixed scales of a fused model are buffers and never change; which weights
train is a setting. Both models are held whole: healing costs the memory of two models plus the student's
gradients and optimizer state.

A healing run with a state folder saves its trainable tensors, the optimizer's moments and the step every
``SAVE_EVERY`` steps (safetensors and JSON, never pickle); started again with the same settings, weights and
texts it goes on from there, and ends with the same tensors as a run that was never stopped (the batch order
is a function of the seed and the step). A state left by any other run is not resumed but replaced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..batches import fit_to_positions, padded_batch
from ..errors import UserError
from ..families import find_sites
from ..layer_runs import LayerStackError, layer_stack, stack_index
from ..records import fusion_records
from .distill import fused_tensors, next_token_kl
from .precision import PRECISIONS, autocast, check_device_precision, check_precision

TRAINED = ("all", "layers", "mlps")
SCHEDULES = ("constant", "linear")  # the rate over the steps: fixed, or falling in a straight line to 0
SAVE_EVERY = 25


@dataclass
class HealSettings:
    """How ``compress --heal-steps N`` heals a compressed causal language model."""

    heal_steps: int = field(
        default=0,
        metadata={
            "help": "steps of healing after compression: the compressed model trained toward the original's "
            "next-token distributions on text sampled from it (0: off)"
        },
    )
    heal_texts: int = field(
        default=1000, metadata={"help": "texts sampled from the original model to heal on"}
    )
    heal_data: Path | None = field(
        default=None,
        metadata={
            "help": "heal on the texts of this file (one a line, or a TSV/CSV/JSONL text column) instead"
        },
    )
    heal_lr: float = field(default=2e-4, metadata={"help": "healing learning rate (AdamW)"})
    heal_schedule: str = field(
        default="constant",
        metadata={
            "help": "the healing rate over the steps: 'constant', or 'linear' (from --heal-lr down to 0 at "
            "the last step)",
            "choices": SCHEDULES,
        },
    )
    heal_batch_size: int = field(default=8, metadata={"help": "texts per healing step"})
    heal_max_length: int = field(default=128, metadata={"help": "longest healing text in tokens"})
    heal_train: str = field(
        default="all",
        metadata={
            "help": "which weights heal: 'all', the fused 'layers', or the fused 'mlps' (fixed scales never)",
            "choices": TRAINED,
        },
    )
    heal_seed: int = field(default=0, metadata={"help": "seed of the healing texts and of their order"})
    heal_precision: str = field(
        default="bfloat16",  # chosen on validation texts (BENCHMARKS.md, heal-choice-smollm2)
        metadata={
            "help": "the precision of the models' matrix products while healing: 'bfloat16' (autocast; the "
            "weights, their gradients and the optimizer stay float32) or 'float32'",
            "choices": PRECISIONS,
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.heal_data, str):
            self.heal_data = Path(self.heal_data)
        if self.heal_steps < 0:
            raise UserError(f"--heal-steps must be at least 0, not {self.heal_steps}")
        for name in ("heal_texts", "heal_batch_size", "heal_max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not self.heal_lr > 0:
            raise UserError(f"--heal-lr must be above 0, not {self.heal_lr}")
        if self.heal_schedule not in SCHEDULES:
            raise UserError(
                f"unknown --heal-schedule {self.heal_schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if self.heal_train not in TRAINED:
            raise UserError(f"unknown --heal-train {self.heal_train!r}: choose one of {', '.join(TRAINED)}")
        check_precision(self.heal_precision, "--heal-precision")
        changed = [
            f.name for f in fields(self) if f.name != "heal_steps" and getattr(self, f.name) != f.default
        ]
        if changed and not self.heal_steps:  # a setting of a heal that will not run: --heal-steps forgotten
            raise UserError(f"--{changed[0].replace('_', '-')} sets up healing: add --heal-steps N")

    def record(self) -> dict:
        """The settings as ``fusion.json`` keeps them (without the ``heal_`` prefixes)."""
        return {
            k.removeprefix("heal_"): (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
        }


def heal(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    texts: list[str],
    settings: HealSettings,
    progress: Callable[[str], None] | None = None,
    state: Path | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict:
    """Heal ``student`` toward ``teacher`` on ``texts`` for ``settings.heal_steps`` steps, in place; the
    record of what was done (KL of the first and last steps, seconds). ``state``: a folder for a resumable
    run (created, and left for the caller to remove once the result is saved). ``after_step(n)`` is called
    after the n-th step (a benchmark measures the student there, without gradients)."""
    say = progress or (lambda line: None)
    check_device_precision(settings.heal_precision, next(student.parameters()).device, "--heal-precision")
    batch = fit_to_positions(padded_batch(tokenizer, texts, max_length=settings.heal_max_length), student)
    trained = trainable(student, settings.heal_train)
    optimizer = torch.optim.AdamW(trained, lr=settings.heal_lr, weight_decay=0.0)
    start_of_run = fingerprint(trained, texts) if state is not None else None
    first_step, kls = _resume(state, settings, start_of_run, trained, optimizer)
    teacher.eval().requires_grad_(False)
    was_training = student.training
    student.eval()
    start = time.perf_counter()
    try:
        for step in range(first_step, settings.heal_steps):
            rows = _rows(step, len(texts), settings)
            for group in optimizer.param_groups:  # a function of the step alone, so a resumed run matches
                group["lr"] = rate(settings, step)
            inputs = {key: value[rows] for key, value in batch.items()}
            longest = int(inputs["attention_mask"].sum(1).max())
            inputs = {key: value[:, :longest] for key, value in inputs.items()}
            with autocast(student, settings.heal_precision):
                with torch.no_grad():
                    target = teacher(**inputs).logits
                logits = student(**inputs).logits
            loss = next_token_kl(logits, target, inputs["attention_mask"])  # in float32
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            kls.append(float(loss.detach()))
            if (step + 1) % max(1, settings.heal_steps // 20) == 0 or step + 1 == settings.heal_steps:
                say(f"heal: step {step + 1}/{settings.heal_steps}, KL {kls[-1]:.4f}")
            if state is not None and ((step + 1) % SAVE_EVERY == 0 or step + 1 == settings.heal_steps):
                _save(state, settings, start_of_run, step + 1, trained, optimizer, kls)
            if after_step is not None:
                after_step(step + 1)
    finally:
        student.train(was_training)
        for parameter in student.parameters():
            parameter.requires_grad_(True)
    return {
        **settings.record(),
        "texts": len(texts),
        "kl_first": kls[0] if kls else None,
        "kl_last": kls[-1] if kls else None,
        "seconds": time.perf_counter() - start,
    }


def rate(settings: HealSettings, step: int) -> float:
    """The learning rate of the 0-based ``step``."""
    if settings.heal_schedule == "linear":
        return settings.heal_lr * (1 - step / settings.heal_steps)
    return settings.heal_lr


def trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters healing trains (the rest are frozen): every one, those of the layers holding a fused
    MLP, or those of the fused MLPs alone."""
    for parameter in model.parameters():
        parameter.requires_grad_(which == "all")
    if which == "all":
        return list(model.parameters())
    if which == "mlps":
        chosen = fused_tensors(model)
    else:
        chosen = [p for layer in _fused_layers(model) for p in layer.parameters()]
    chosen = list({id(p): p for p in chosen}.values())
    if not chosen:
        raise UserError(f"--heal-train {which} names no weight: nothing of this model was fused")
    for parameter in chosen:
        parameter.requires_grad_(True)
    return chosen


def _fused_layers(model: nn.Module) -> list[nn.Module]:
    """The layers (of the one list of layers) that hold a fused MLP."""
    fused = {record.name for record in fusion_records(model)}
    sites = [site for site in find_sites(model) if site.name in fused]
    if not sites:
        return []
    try:
        _, stack = layer_stack(model, sites)
    except LayerStackError:
        raise UserError("--heal-train layers needs the fused MLPs in one list of layers") from None
    return [stack[index] for index in sorted({stack_index(model, site.name) for site in sites})]


def _rows(step: int, count: int, settings: HealSettings) -> torch.Tensor:
    """The texts of ``step``: consecutive slices of a seeded shuffle of all texts, reshuffled each pass."""
    per_pass = max(1, count // settings.heal_batch_size)
    rounds, position = divmod(step, per_pass)
    order = torch.randperm(
        count, generator=torch.Generator().manual_seed(settings.heal_seed * 100_003 + rounds)
    )
    start = position * settings.heal_batch_size
    return order[start : start + settings.heal_batch_size]


STATE_FILE = "heal-state.json"  # the step reached, the KLs, and which tensors file holds that step


def _tensors_file(step: int) -> str:
    return f"heal-state-{step:06d}.safetensors"


def fingerprint(trained: list[nn.Parameter], texts: list[str]) -> str:
    """A digest of what a healing run starts from, its texts and trainable weights: a state saved by a
    run of another compression (the same shapes, other weights) or on other texts is never resumed."""
    digest = hashlib.blake2b(json.dumps(texts).encode(), digest_size=16)
    for parameter in trained:
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _save(state: Path, settings: HealSettings, start: str, step: int, trained, optimizer, kls) -> None:
    """The run's state after ``step`` steps. The tensors go to a file of their own step, and the JSON that
    names it is replaced last: a kill at any point leaves a JSON and the tensors of the step it names."""
    state.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for number, parameter in enumerate(trained):
        tensors[f"{number}.weight"] = parameter.detach().contiguous()
        moments = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"{number}.{key}"] = moments[key].contiguous()
    save_file(tensors, str(state / _tensors_file(step)))
    record = {"settings": settings.record(), "start": start, "step": step, "kls": kls}
    (state / f".{STATE_FILE}.tmp").write_text(json.dumps({**record, "tensors": _tensors_file(step)}))
    (state / f".{STATE_FILE}.tmp").replace(state / STATE_FILE)
    for older in state.glob("heal-state-*.safetensors"):
        if older.name != _tensors_file(step):
            older.unlink()


def drop_state(state: Path) -> None:
    """Remove the files a healing run kept for resuming (only those: never a folder's other contents)."""
    for path in [state / STATE_FILE, state / f".{STATE_FILE}.tmp", *state.glob("heal-state-*.safetensors")]:
        path.unlink(missing_ok=True)
    if state.is_dir() and not any(state.iterdir()):
        state.rmdir()


def _resume(
    state: Path | None, settings: HealSettings, start: str | None, trained, optimizer
) -> tuple[int, list]:
    """The step to start from and the KLs so far: 0 and none, unless ``state`` holds a run of the same
    settings that started from the same weights and texts (``start``, a :func:`fingerprint`), whose tensors
    and optimizer moments are then put back."""
    if state is None or not (state / STATE_FILE).is_file():
        return 0, []
    saved = json.loads((state / STATE_FILE).read_text())
    if saved["settings"] != settings.record() or saved.get("start") != start:
        return 0, []
    tensors = load_file(str(state / saved["tensors"]))
    with torch.no_grad():
        for number, parameter in enumerate(trained):
            parameter.copy_(tensors[f"{number}.weight"])
            if f"{number}.exp_avg" in tensors:
                optimizer.state[parameter] = {
                    "step": torch.tensor(float(saved["step"])),
                    "exp_avg": tensors[f"{number}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"{number}.exp_avg_sq"].clone(),
                }
    return saved["step"], list(saved["kls"])

"""``compress(source, out, ...)``: load (or stream) a model, fuse it by a recipe, save it, optionally verify.

The library verb behind ``mlp-fusion compress``. It decides what the command line does not: the recipe
(``calibrated`` for causal language models, ``paper`` otherwise; see :mod:`mlp_fusion.recipes`), and whether
a local checkpoint is fused one layer at a time (into ``out``, data-free or calibrated on given texts)
or loaded whole.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import recipes
from .config import FusionConfig, check_field_names
from .errors import UserError, check_instance
from .fuse import fuse
from .records import FusionReport

if TYPE_CHECKING:
    from .training.heal import HealSettings


@dataclass
class Compressed:
    """What :func:`compress` did: the report, the recipe, whether it streamed, and the verification numbers."""

    source: str
    report: FusionReport
    recipe: str
    streamed: bool
    out: Path | None
    model: object = None  # the fused model when it was loaded whole (None when streamed)
    tokenizer: object = None
    verify: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.source,
            **self.report.to_dict(),
            "recipe": self.recipe,
            "out": str(self.out) if self.out else None,
            "streamed": self.streamed,
            **({"verify": self.verify} if self.verify else {}),
        }


def compress(
    source: str | Path,
    out: str | Path | None = None,
    config: FusionConfig | None = None,
    *,
    recipe: str = "auto",
    calibration_texts: list[str] | None = None,
    calibration_samples: int = 128,
    max_length: int = 128,
    dtype: str = "float32",
    device: str = "cpu",
    in_memory: bool = False,
    overwrite: bool = False,
    shard_bytes: int = 2 * 2**30,
    verify: bool = False,
    progress: Callable[[str], None] | None = None,
    heal: HealSettings | None = None,
    size: float | None = None,
    **config_fields,
) -> Compressed:
    """Fuse ``source`` (a bundled alias, directory or hub id) and save it to ``out`` when given.

    Give either a whole ``config`` or its fields as keywords (``ratio=0.5, layers="20-29"``); with fields,
    the recipe fills in the keep fraction. ``calibration_texts`` are used instead of the recipe's own
    calibration source (samples from the model). A local safetensors checkpoint saved to ``out`` is fused
    one layer at a time, calibrated with ``calibration_texts`` or the recipe's samples (drawn from the
    model loaded whole, released before fusing) unless ``verify`` or healing is asked for, or
    ``in_memory``; ``.streamed`` says which. ``heal`` with steps trains the compressed model toward the
    original afterwards (:mod:`mlp_fusion.training.heal`; both models whole in memory). ``size`` (instead of
    a ratio, width or budget) is the fraction of the model's parameters to keep: one ratio over ``layers``
    when they are given, else the plan measured best for a cut of that size (:mod:`mlp_fusion.model_size`).
    """
    from .checkpoint_files import check_writable
    from .loading import LoadSettings, is_fused, resolve

    say = progress or (lambda message: None)
    settings = LoadSettings(dtype=dtype, device=device)
    if calibration_samples < 1 or max_length < 1:
        raise UserError("calibration_samples and max_length must be at least 1")
    check_field_names(config_fields)
    if calibration_texts is not None:
        _check_texts(calibration_texts)
    path = resolve(str(source))
    chosen = _recipe(recipe, source, path, calibration_texts is not None, say)
    if size is not None:
        config_fields.update(_fields_for_size(source, path, size, config, config_fields))
    if config is not None:
        check_instance(config, FusionConfig, "config")
    if config is None:
        config = FusionConfig(**recipes.apply_recipe(chosen, config_fields))
    elif config_fields:
        raise UserError("give a FusionConfig or its fields, not both")
    config.check_calibration(chosen.calibrate or calibration_texts is not None)
    if path is not None:
        check_choices(path, config)
    if heal is not None:
        from .training.heal import HealSettings  # healing is asked for: its settings may be imported

        check_instance(heal, HealSettings, "heal")
    healing = heal if heal is not None and heal.heal_steps else None
    job = _Job(
        source, path, None if out is None else Path(out), config, chosen, settings, calibration_texts,
        calibration_samples, max_length, overwrite, say, healing, _heal_texts(healing, source, path),
    )  # fmt: skip
    if job.out is not None:
        check_writable(job.out, overwrite, source=path)
    streamable = not (in_memory or job.out is None or path is None or is_fused(path))
    if streamable and not (verify or healing):
        streamed = _streamed(job, shard_bytes)
        if streamed is not None:
            return streamed
    elif streamable:
        say(f"fusing in memory: {'--verify' if verify else 'healing'} needs the whole model")
    return _in_memory(job, verify)


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise UserError("calibration_texts must be a list of texts (strings), one text each")
    if not any(text.strip() for text in texts):
        raise UserError("calibration_texts holds no text")


def _fields_for_size(source, path: Path | None, size: float, config, fields: dict) -> dict:
    from .loading import is_fused
    from .model_size import fields_for_size, skeleton

    if config is not None or any(fields.get(name) is not None for name in ("ratio", "width", "budget")):
        raise UserError("give a size, or a ratio, width or budget, not both")
    if path is not None and is_fused(path):
        raise UserError(f"{source} is already fused: a size applies to the original model")
    return fields_for_size(skeleton(str(path or source)), size, fields.get("layers") or "all")


def check_choices(path: Path, config: FusionConfig) -> None:
    """Refuse, before any model is loaded or text sampled, the layers and widths ``config`` cannot give
    the checkpoint at ``path`` (a layer it lacks or has fused already, a width above a layer's), checked on
    the model built on the meta device."""
    from .families import find_sites
    from .loading import is_fused
    from .model_size import skeleton
    from .persistence import read_fusion_file
    from .site_fusion import chosen_sites

    done = {site["name"] for site in read_fusion_file(path)["sites"]} if is_fused(path) else set()
    chosen_sites(find_sites(skeleton(str(path))), config, done)


@dataclass
class _Job:
    """What one :func:`compress` call decided before any model is loaded."""

    source: str | Path
    path: Path | None  # the local directory, None for a hub id
    out: Path | None
    config: FusionConfig
    recipe: recipes.Recipe
    settings: object  # LoadSettings
    texts: list[str] | None  # calibration texts given by the caller
    samples: int
    max_length: int
    overwrite: bool
    say: Callable[[str], None]
    heal: HealSettings | None = None  # with steps: heal after fusing
    heal_texts: list[str] | None = None  # the texts of --heal-data, read before any work


def _heal_texts(heal: HealSettings | None, source, path: Path | None) -> list[str] | None:
    """Healing's checks before any work (a causal language model with its tokenizer), and the texts of
    ``heal_data`` when given (None: they are sampled from the model after fusing)."""
    from .batches import read_probe_texts
    from .loading import has_tokenizer_files

    if heal is None:
        return None
    if not recipes.is_causal_lm(recipes.source_config(source, path)):
        raise UserError(
            "healing needs a causal language model (it trains toward the next-token distributions)"
        )
    if path is not None and not has_tokenizer_files(path):
        raise UserError("healing needs the model's tokenizer, and this model has no tokenizer files")
    return None if heal.heal_data is None else read_probe_texts(heal.heal_data, what="healing data")


def _recipe(name: str, source, path: Path | None, texts_given: bool, say) -> recipes.Recipe:
    """The recipe ``name`` asks for; ``auto`` falls back to ``paper`` (and says so) for a local model with
    no tokenizer to sample calibration texts with."""
    from .loading import has_tokenizer_files

    chosen = recipes.choose_recipe(name, recipes.source_config(source, path))
    if name == "auto" and chosen.calibrate and not texts_given and path is not None:
        if not has_tokenizer_files(path):
            say("recipe paper: this model has no tokenizer to sample calibration texts with")
            return recipes.RECIPES["paper"]
    return chosen


def _chosen_texts(job: _Job, load) -> tuple[list[str] | None, dict | None]:
    """The calibration texts and their record for ``fusion.json``: the given ones, or (the recipe's
    default) texts sampled from the model ``load()`` gives; (None, None) for a data-free recipe."""
    if job.texts is not None:
        used = job.texts[: job.samples]
        return used, {"source": "given", "max_length": job.max_length, "texts": len(used)}
    if not job.recipe.calibrate:
        return None, None
    job.say(
        f"recipe {job.recipe.name}: sampling {job.recipe.sampling.count} calibration texts from the model"
    )
    loaded = load()
    if loaded.tokenizer is None:
        raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
    sampling = recipes.fitted_sampling(job.recipe.sampling, loaded.model)
    used = recipes.sample_texts(loaded.model, loaded.tokenizer, sampling)[: job.samples]
    return used, recipes.sampled_calibration(sampling, job.max_length, len(used))


def _sampled(record: dict | None, texts):
    """The texts to write next to the checkpoint: the samples, when the record says they were sampled."""
    return texts if record is not None and record["source"] == "sampled" else None


def _calibration(job: _Job, tokenizer, texts: list[str] | None) -> dict | None:
    from .calibration import calibration_batch

    if texts is None:
        return None
    if tokenizer is None:
        raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
    return calibration_batch(tokenizer, texts, None, job.max_length)


def _streamed(job: _Job, shard_bytes: int) -> Compressed | None:
    """Fuse the local checkpoint layer by layer into ``job.out``; None when it cannot be streamed."""
    from .loading import load_model, load_tokenizer
    from .streaming import NotStreamable, fuse_checkpoint

    # the model loaded whole only to sample, and released before the first layer is read
    texts, record = _chosen_texts(job, lambda: load_model(str(job.path), job.settings))
    tokenizer = load_tokenizer(job.path)
    batch = _calibration(job, tokenizer, texts)
    samples = _sampled(record, texts)
    try:
        job.say(f"fusing {job.path} layer by layer into {job.out}")
        report = fuse_checkpoint(
            job.path, job.out, job.config, dtype=job.settings.torch_dtype(),
            device=job.settings.torch_device(), tokenizer=tokenizer, overwrite=job.overwrite,
            shard_bytes=shard_bytes, progress=job.say, calibration=batch,
            annotate=lambda model: recipes.record(model, job.recipe, record, samples),
        )  # fmt: skip
    except NotStreamable as reason:
        job.say(f"fusing in memory: this checkpoint cannot be streamed ({reason})")
        return None
    return Compressed(str(job.path), report, job.recipe.name, True, job.out)


def _in_memory(job: _Job, verify: bool) -> Compressed:
    from .batches import probe_batch
    from .loading import load_model
    from .persistence import from_pretrained, save_pretrained
    from .verification import agreement, compare, main_output

    job.say(f"loading {job.source}")
    loaded = load_model(str(job.source), job.settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    if verify:
        batch = probe_batch(model, tokenizer)
        original = main_output(model, batch)
    used, record = _chosen_texts(job, lambda: loaded)
    calibration = _calibration(job, tokenizer, used)
    recipes.record(model, job.recipe, record, _sampled(record, used))
    teacher = copy.deepcopy(model) if job.heal is not None else None
    report = fuse(model, job.config, progress=job.say, calibration=calibration)
    if teacher is not None:
        _heal(job, model, teacher, tokenizer)
        del teacher
    result = Compressed(loaded.source, report, job.recipe.name, False, job.out, model, tokenizer)
    if verify:
        fused = main_output(model, batch)
        result.verify["fused_vs_original"] = agreement(model, original, fused, batch["attention_mask"])
    if job.out is not None:
        save_pretrained(model, job.out, tokenizer, overwrite=job.overwrite)
        if job.heal is not None:
            from .training.heal import drop_state

            drop_state(_heal_state(job.out))
        if verify:
            reloaded = main_output(from_pretrained(job.out, device=job.settings.torch_device()), batch)
            result.verify["reloaded_vs_fused"] = compare(fused, reloaded, batch["attention_mask"])
    return result


def _heal(job: _Job, model, teacher, tokenizer) -> None:
    """Heal the fused ``model`` toward ``teacher`` as ``job.heal`` says; recorded with the recipe. A
    killed run leaves its state next to ``--out`` and the same command goes on from it."""
    from .training.heal import heal

    texts, source = job.heal_texts, "given"
    if texts is None:
        sampling = recipes.Sampling(count=job.heal.heal_texts, seed=job.heal.heal_seed)
        job.say(f"healing: sampling {sampling.count} texts from the original model")
        texts, source = (
            recipes.sample_texts(teacher, tokenizer, recipes.fitted_sampling(sampling, teacher)),
            "sampled",
        )
    state = None if job.out is None else _heal_state(job.out)
    done = heal(model, teacher, tokenizer, texts, job.heal, job.say, state)
    record = getattr(model, recipes.RECIPE_ATTR)
    setattr(model, recipes.RECIPE_ATTR, {**record, "heal": {**done, "source": source}})


def _heal_state(out: Path) -> Path:
    return out.parent / f".{out.name}.heal-state"

"""``compress(source, out, ...)``: load (or stream) a model, fuse it by a recipe, save it, optionally verify.

The library verb behind ``mlp-fusion compress``. It decides what the command line does not: the recipe
(``calibrated`` for causal language models, ``paper`` otherwise; see :mod:`mlp_fusion.recipes`), and whether
a local checkpoint is fused one layer at a time (into ``out``, data-free or calibrated on given texts)
or loaded whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import recipes
from .config import FusionConfig
from .errors import UserError
from .fuse import FusionReport, fuse


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
    **config_fields,
) -> Compressed:
    """Fuse ``source`` (a bundled alias, directory or hub id) and save it to ``out`` when given.

    Give either a whole ``config`` or its fields as keywords (``ratio=0.5, layers="20-29"``); with fields,
    the recipe fills in the keep fraction. ``calibration_texts`` are used instead of the recipe's own
    calibration source (samples from the model). A local safetensors checkpoint saved to ``out`` is fused
    one layer at a time, calibrated with ``calibration_texts`` or the recipe's samples (drawn from the
    model loaded whole, released before fusing) unless ``verify`` is set or ``in_memory`` is asked for;
    ``.streamed`` says which.
    """
    from .loading import LoadSettings, has_tokenizer_files, is_fused, load_model, resolve

    say = progress or (lambda message: None)
    settings = LoadSettings(dtype=dtype, device=device)
    path = resolve(str(source))
    chosen = recipes.choose_recipe(recipe, recipes.source_config(source, path))
    if (
        recipe == "auto"
        and chosen.calibrate
        and calibration_texts is None
        and not (path is None or has_tokenizer_files(path))
    ):
        say("recipe paper: this model has no tokenizer to sample calibration texts with")
        chosen = recipes.RECIPES["paper"]
    if config is None:
        config = FusionConfig(**recipes.apply_recipe(chosen, config_fields))
    elif config_fields:
        raise UserError("give a FusionConfig or its fields, not both")
    if calibration_samples < 1 or max_length < 1:
        raise UserError("calibration_samples and max_length must be at least 1")
    if out is not None:
        from .checkpoint_files import check_writable

        check_writable(out, overwrite)
    whole = in_memory or out is None or path is None or is_fused(path)
    if not (whole or verify):
        # the model loaded whole only to sample, and released before the first layer is read
        load = lambda: load_model(str(path), settings)  # noqa: E731
        texts, record = _chosen_texts(chosen, calibration_texts, calibration_samples, max_length, load, say)
        done = _streamed(
            path, Path(out), config, settings, chosen, texts, record, max_length, overwrite, shard_bytes, say
        )
        if done is not None:
            return Compressed(str(path), done, chosen.name, True, Path(out))
    elif verify and not whole:
        say("fusing in memory: --verify needs the whole model")
    return _in_memory(
        source, out, config, chosen, settings, calibration_texts, calibration_samples, max_length,
        overwrite=overwrite, verify=verify, say=say,
    )  # fmt: skip


def _chosen_texts(recipe, texts, samples: int, max_length: int, load, say):
    """The calibration texts and their record for ``fusion.json``: the given ones, or (the recipe's
    default) texts sampled from the model ``load()`` gives; (None, None) for a data-free recipe."""
    if texts is not None:
        used = texts[:samples]
        return used, {"source": "given", "max_length": max_length, "texts": len(used)}
    if not recipe.calibrate:
        return None, None
    say(f"recipe {recipe.name}: sampling {recipe.sampling.count} calibration texts from the model")
    loaded = load()
    if loaded.tokenizer is None:
        raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
    used = recipes.sample_texts(loaded.model, loaded.tokenizer, recipe.sampling)[:samples]
    return used, recipes.sampled_calibration(recipe.sampling, max_length, len(used))


def _sampled(record: dict | None, texts):
    """The texts to write next to the checkpoint: the samples, when the record says they were sampled."""
    return texts if record is not None and record["source"] == "sampled" else None


def _streamed(
    path: Path, out: Path, config, settings, recipe, texts, record, max_length, overwrite, shard_bytes, say
) -> FusionReport | None:
    from .calibration import calibration_batch
    from .loading import load_tokenizer
    from .streaming import NotStreamable, fuse_checkpoint

    tokenizer = load_tokenizer(path)
    batch = None
    if texts is not None:
        if tokenizer is None:
            raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
        batch = calibration_batch(tokenizer, texts, None, max_length)
    samples = _sampled(record, texts)
    try:
        say(f"fusing {path} layer by layer into {out}")
        return fuse_checkpoint(
            path, out, config, dtype=settings.torch_dtype(), device=settings.torch_device(),
            tokenizer=tokenizer, overwrite=overwrite, shard_bytes=shard_bytes, progress=say, calibration=batch,
            annotate=lambda model: recipes.record(model, recipe, record, samples),
        )  # fmt: skip
    except NotStreamable as reason:
        say(f"fusing in memory: this checkpoint cannot be streamed ({reason})")
        return None


def _in_memory(
    source, out, config, recipe, settings, texts, samples, max_length, *, overwrite, verify, say
) -> Compressed:
    from .batches import probe_batch
    from .calibration import calibration_batch
    from .loading import load_model
    from .persistence import from_pretrained, save_pretrained
    from .verification import compare, main_output

    say(f"loading {source}")
    loaded = load_model(str(source), settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    if verify:
        batch = probe_batch(model, tokenizer)
        original = main_output(model, batch)
    used, record = _chosen_texts(recipe, texts, samples, max_length, lambda: loaded, say)
    calibration = None
    if used is not None:
        if tokenizer is None:
            raise UserError("calibration needs the model's tokenizer, and this model has no tokenizer files")
        calibration = calibration_batch(tokenizer, used, None, max_length)
    recipes.record(model, recipe, record, _sampled(record, used))
    report = fuse(model, config, progress=say, calibration=calibration)
    result = Compressed(
        loaded.source, report, recipe.name, False, Path(out) if out else None, model, tokenizer
    )
    if verify:
        fused = main_output(model, batch)
        result.verify["fused_vs_original"] = compare(original, fused, batch["attention_mask"])
    if out is not None:
        save_pretrained(model, out, tokenizer, overwrite=overwrite)
        if verify:
            reloaded = main_output(from_pretrained(out, device=settings.torch_device()), batch)
            result.verify["reloaded_vs_fused"] = compare(fused, reloaded, batch["attention_mask"])
    return result

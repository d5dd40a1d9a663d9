"""The fused checkpoint format: saving and loading fused models. Never pickle; every write is atomic.

A fused checkpoint is ``config.json`` of the base model, ``model.safetensors`` (stored weights and scale
buffers), tokenizer files when given, and ``fusion.json`` (what was fused and how). The files underneath
are :mod:`mlp_fusion.checkpoint_files`; export to a plain checkpoint is :mod:`mlp_fusion.exporting`.

Each weight the model computes from stored tensors also has an empty placeholder under its plain name
(:func:`placeholders`): transformers, which does not know the format, would otherwise build such a weight at
random and only warn (low-rank factors keep every shape it checks); the placeholder's shape makes it refuse
the file instead. Readers here skip the placeholders.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, fields
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint_files import (
    DTYPES,
    WEIGHTS_FILE,
    aligned,
    atomic_directory,
    materialise_derived_buffers,
    meta_model,
    resolve_dtype,
    shared_names,
    weight_files,
    write_side_files,
)
from .errors import UserError, check_loaded, first_line
from .families import find_sites
from .narrowing import attach_low_rank, attach_scale, use_compatible_experts_kernel
from .parametrizations import has_input_scales
from .recipes import RECIPE_ATTR, SAMPLES_FILE
from .records import RECORD_ATTR, SiteRecord, fusion_records
from .shard_io import open_stored
from .sites import MlpSite
from .textfiles import read_text
from .version import __version__

FORMAT_VERSION = 1
FUSION_FILE = "fusion.json"


def save_pretrained(
    model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False
) -> Path:
    """Save a fused model (and its tokenizer) to ``directory`` in the fused format."""
    check_loaded(model)
    check_fused_format(model)
    return atomic_directory(Path(directory), overwrite, lambda tmp: _write_fused(model, tmp, tokenizer))


def check_fused_format(model: nn.Module) -> None:
    """Refuse a model whose scales act on inputs (LoRA attached): its tensors are not the fused format's."""
    if has_input_scales(model):
        raise UserError(
            "this model carries LoRA adapters: merge them first (mlp_fusion.merge_lora), then save or export"
        )


def follow_native_save(model: nn.Module) -> None:
    """Make the model's own ``save_pretrained`` (transformers', which the Trainer calls too) write the fused
    format into the directory, as that method writes its files, instead of a checkpoint that loads wrong; and
    its ``load_state_dict`` (the Trainer's, for the best epoch's weights) pass over the placeholders.
    :func:`mlp_fusion.fuse` calls it on every model it fuses, :func:`from_pretrained` on every model it loads."""
    if not getattr(model, _PLACEHOLDERS_SKIPPED, False):
        model.register_load_state_dict_pre_hook(_drop_placeholders)
        setattr(model, _PLACEHOLDERS_SKIPPED, True)

    def native_save(self: nn.Module, save_directory: str | Path, *args, **kwargs) -> None:
        check_fused_format(self)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_fused(self, directory, None)

    if hasattr(model, "save_pretrained"):
        model.save_pretrained = types.MethodType(native_save, model)


def _write_fused(model: nn.Module, directory: Path, tokenizer) -> None:
    state = model.state_dict()
    for group in shared_names(model):  # tied weights: stored once, under the first name
        for name in group[1:]:
            state.pop(name, None)
    tensors = {**{key: tensor.contiguous() for key, tensor in state.items()}, **placeholders(model)}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_description(model, directory, tokenizer)


_PLACEHOLDERS_SKIPPED = "_mlp_fusion_skips_placeholders"


def _drop_placeholders(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict``'s pre-hook: a fused checkpoint's placeholders are no tensors of the model."""
    for key in placeholders(module, prefix.rstrip(".")):
        state_dict.pop(key, None)


def placeholders(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """An empty tensor under the plain name of every weight ``model`` computes from stored tensors (a fixed
    scale, low-rank factors), each name after ``prefix``."""
    return {
        ".".join(part for part in (prefix, name, attr) if part): torch.empty(0)
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
        for attr in module.parametrizations
    }


def write_description(model: nn.Module, directory: Path, tokenizer) -> None:
    """Everything of a fused checkpoint but its tensors: configs, tokenizer, ``fusion.json``."""
    records = fusion_records(model)
    fusion = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "source_model": getattr(model.config, "_name_or_path", "") or "",
        "methods": sorted({record.method for record in records}),
        "sites": [asdict(record) for record in records],
    }
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is not None:
        fusion["recipe"] = {key: value for key, value in recipe.items() if key != "samples"}
        if recipe.get("samples"):
            (directory / SAMPLES_FILE).write_text("\n".join(recipe["samples"]) + "\n")
    write_side_files(directory, model, tokenizer, {FUSION_FILE: fusion})


def from_pretrained(
    directory: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`: the stock architecture, narrowed, scales re-attached.

    The model is built on the meta device and takes the stored tensors directly: nothing is initialised at
    random and nothing passes through another dtype. ``dtype`` defaults to the checkpoint's own, ``device``
    to the CPU; the fixed scales stay float32.
    """
    directory = Path(directory)
    model, sites = fused_skeleton(directory, dtype)
    device = torch.device(device if device is not None else "cpu")
    materialise_derived_buffers(model, device)
    _load_stored_tensors(model, weight_files(directory), device)
    follow_native_save(model)
    use_compatible_experts_kernel(model, sites)
    return model.eval()


def fused_skeleton(
    directory: Path, dtype: str | torch.dtype | None = None
) -> tuple[nn.Module, list[MlpSite]]:
    """The fused checkpoint's model on the meta device: stock architecture, MLPs narrowed and scales or
    factors attached as ``fusion.json`` says, fusion records set; shapes only, nothing loaded."""
    fusion = read_fusion_file(directory)
    model_class, config = _architecture(directory, fusion)
    dtype = _stored_dtype(directory, fusion) if dtype is None else resolve_dtype(dtype)
    model = meta_model(model_class, config, dtype, directory)
    records = [
        SiteRecord(**{f.name: site.get(f.name) for f in fields(SiteRecord)}) for site in fusion["sites"]
    ]
    sites = {site.name: site for site in find_sites(model)}
    for record in records:
        site = sites.get(record.name)
        if site is None:
            raise UserError(
                f"{directory / FUSION_FILE} names {record.name!r}, which {type(model).__name__} lacks"
            )
        site.write(site.read().zeros(record.width))
        if record.scaled:
            attach_scale(site, torch.ones(site.experts or 1, record.width))
        if record.rank is not None:
            attach_low_rank(site, record.rank, decompose=False)
    setattr(model, RECORD_ATTR, records)
    _restore_recipe(model, directory, fusion)
    return model, list(sites.values())


def _restore_recipe(model: nn.Module, directory: Path, fusion: dict) -> None:
    """The recipe record (and sampled texts) ``fusion.json`` holds, kept so that a re-save writes them."""
    recipe = fusion.get("recipe")
    if not isinstance(recipe, dict):
        return
    samples = directory / SAMPLES_FILE
    texts = read_text(samples, "calibration samples").splitlines() if samples.is_file() else None
    setattr(model, RECIPE_ATTR, {**recipe, "samples": texts})


def _architecture(directory: Path, fusion: dict) -> tuple[type, transformers.PretrainedConfig]:
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {directory / 'config.json'}: {first_line(error)}") from None
    model_class = getattr(transformers, fusion["architecture"], None)
    if model_class is None:
        raise UserError(
            f"{directory / FUSION_FILE} names architecture {fusion['architecture']!r}, which this transformers "
            f"version ({transformers.__version__}) does not have"
        )
    return model_class, config


def _stored_dtype(directory: Path, fusion: dict) -> torch.dtype:
    name = str(fusion.get("dtype", "float32"))
    if name not in DTYPES:
        raise UserError(f"{directory / FUSION_FILE} names an unknown dtype {name!r}; save the model again")
    return DTYPES[name]


def _load_stored_tensors(model: nn.Module, files: list[Path], device: torch.device) -> None:
    """Put every stored tensor in place (cast to the dtype the model holds it in), then tie shared weights."""
    expected, skipped = model.state_dict(), set(placeholders(model))
    state = {}
    for path in files:
        with open_stored(path, device) as stored:
            for key in stored.keys():
                if key in skipped:
                    continue
                if key in expected:
                    state[key] = aligned(stored.get_tensor(key).to(expected[key].dtype))
                else:
                    state[key] = None
    unexpected = sorted(key for key, value in state.items() if value is None)
    for group in shared_names(model):  # tied weights: the file stores one of their names
        stored = next((state[name] for name in group if state.get(name) is not None), None)
        for name in group:
            state.setdefault(name, stored)
    mismatch = f"{files[0].parent} does not match {FUSION_FILE}"
    try:
        model.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=False, assign=True)
    except RuntimeError as error:  # a stored shape differs from fusion.json's widths
        raise UserError(
            f"{mismatch} ({first_line(error)}); the checkpoint is damaged, save it again"
        ) from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(name for name, tensor in model.state_dict().items() if tensor.is_meta)
    if missing or unexpected:
        raise UserError(
            f"{mismatch} (missing {missing[:3]}, unexpected {unexpected[:3]}); the checkpoint is damaged, "
            "save it again"
        )


def read_fusion_file(directory: Path) -> dict:
    """The parsed and checked ``fusion.json`` of a fused checkpoint directory."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give the folder written by save_pretrained")
    path = directory / FUSION_FILE
    if not path.is_file():
        hint = (
            "it looks like a plain checkpoint: load it with transformers"
            if (directory / "config.json").is_file()
            else "it holds no model: give the folder that compress or save_pretrained wrote"
        )
        raise UserError(f"{path} is missing, so {directory} is not a fused checkpoint; {hint}")
    try:
        fusion = json.loads(path.read_text())
        version, sites = fusion["format_version"], fusion["sites"]
        if not isinstance(fusion["architecture"], str) or not isinstance(version, int):
            raise ValueError("bad header")
        if not isinstance(sites, list) or not all(_valid_site(s) for s in sites):
            raise ValueError("bad site list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(
            f"{path} is damaged (not the JSON that save_pretrained writes); save the model again"
        ) from None
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {version}; this mlp-fusion reads up to {FORMAT_VERSION}: upgrade it"
        )
    return fusion


def info(directory: str | Path) -> dict:
    """What a fused checkpoint holds, read from its files without building the model: its ``fusion.json``
    (architecture, source, recipe and healing, one entry a fused site) and ``parameters``, the numbers
    stored in its weights files (weights and scales), counted from their headers."""
    directory = Path(directory)
    fusion = read_fusion_file(directory)
    total = 0
    for path in weight_files(directory):
        with open_stored(path) as stored:
            for name in stored.keys():
                total += math.prod(stored.get_slice(name).get_shape())
    return {**fusion, "parameters": total}


def _valid_site(site: object) -> bool:
    return (
        isinstance(site, dict)
        and isinstance(site.get("name"), str)
        and isinstance(site.get("width"), int)
        and site["width"] >= 1
        and isinstance(site.get("scaled", False), bool)
        and (site.get("rank") is None or isinstance(site["rank"], int) and site["rank"] >= 1)
    )

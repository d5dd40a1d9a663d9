"""Saving, loading and exporting fused models. Never pickle; every write is atomic.

A fused checkpoint is ``config.json`` of the base model, ``model.safetensors`` (stored weights and scale
buffers), tokenizer files when given, and ``fusion.json`` (what was fused and how). An export folds the
scales into the weights and is a plain checkpoint that vanilla ``transformers`` loads.
"""

from __future__ import annotations

import copy
import json
import shutil
import types
import uuid
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.utils import parametrize

from .adapters import find_sites
from .errors import UserError, first_line
from .fuse import AFTER_FUSE, RECORD_ATTR, SiteRecord, fusion_records
from .narrowing import attach_low_rank, attach_scale, use_compatible_experts_kernel
from .parametrizations import has_input_scales

FORMAT_VERSION = 1
FUSION_FILE = "fusion.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_NOTE_FILE = "mlp_fusion_export.json"


def save_pretrained(
    model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False
) -> Path:
    """Save a fused model (and its tokenizer) to ``directory`` in the fused format."""
    _check_fused_format(model)
    return _atomic_directory(Path(directory), overwrite, lambda tmp: _write_fused(model, tmp, tokenizer))


def _check_fused_format(model: nn.Module) -> None:
    """Refuse a model whose scales act on inputs (LoRA attached): its tensors are not the fused format's."""
    if has_input_scales(model):
        raise UserError(
            "this model carries LoRA adapters: merge them first (mlp_fusion.merge_lora), then save or export"
        )


def follow_native_save(model: nn.Module) -> None:
    """Make the model's own ``save_pretrained`` (transformers', which the Trainer calls too) write the fused
    format into the directory, as that method writes its files, instead of a checkpoint that loads wrong."""

    def native_save(self: nn.Module, save_directory: str | Path, *args, **kwargs) -> None:
        _check_fused_format(self)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_fused(self, directory, None)

    if hasattr(model, "save_pretrained"):
        model.save_pretrained = types.MethodType(native_save, model)


AFTER_FUSE.append(follow_native_save)


def _write_fused(model: nn.Module, directory: Path, tokenizer) -> None:
    from . import __version__

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
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / FUSION_FILE).write_text(json.dumps(fusion, indent=2) + "\n")


def from_pretrained(directory: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`: the stock architecture, narrowed, scales re-attached."""
    directory = Path(directory)
    fusion = read_fusion_file(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} is missing; the checkpoint is incomplete, save it again")
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
    dtype = getattr(torch, str(fusion.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(
            f"{directory / FUSION_FILE} names an unknown dtype {fusion.get('dtype')!r}; save the model again"
        )
    model = model_class(config).to(dtype)
    if (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    records = [
        SiteRecord(**{f.name: site.get(f.name) for f in fields(SiteRecord)}) for site in fusion["sites"]
    ]
    sites = {site.name: site for site in find_sites(model)}
    with torch.no_grad():
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
                attach_low_rank(site, record.rank)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise UserError(
            f"cannot load {weights}: {first_line(error)}; the file is damaged, save it again"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match {FUSION_FILE} (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); the checkpoint is damaged, save it again"
        )
    setattr(model, RECORD_ATTR, records)
    follow_native_save(model)
    use_compatible_experts_kernel(model, list(sites.values()))
    model.eval()
    return model.to(device) if device is not None else model


def read_fusion_file(directory: Path) -> dict:
    """The parsed and checked ``fusion.json`` of a fused checkpoint directory."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give the folder written by save_pretrained")
    path = directory / FUSION_FILE
    if not path.is_file():
        hint = (
            "it looks like a plain checkpoint: load it with transformers"
            if (directory / "config.json").is_file()
            else "save the model again"
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


def _valid_site(site: object) -> bool:
    return (
        isinstance(site, dict)
        and isinstance(site.get("name"), str)
        and isinstance(site.get("width"), int)
        and site["width"] >= 1
        and isinstance(site.get("scaled", False), bool)
        and (site.get("rank") is None or isinstance(site["rank"], int) and site["rank"] >= 1)
    )


def export(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Fold the scales into the weights and save a plain checkpoint that vanilla transformers loads.

    Needs every MLP whose width one config field sets to have the same width. The exported model computes
    the same function but no longer has the fused model's fine-tuning dynamics.
    """
    _check_fused_format(model)
    sites = find_sites(model)
    fused = {record.name for record in fusion_records(model)}
    unknown = [site.name for site in sites if site.config_key is None and site.name in fused]
    if unknown:
        raise UserError(
            f"cannot export: no config field sets the width of {unknown[0]}; keep the fused format (save_pretrained)"
        )
    widths: dict[str, set[int]] = {}
    for site in sites:
        if site.config_key is not None:
            widths.setdefault(site.config_key, set()).add(site.width)
    for key, values in widths.items():
        if len(values) > 1:
            raise UserError(
                f"cannot export: MLPs set by config field {key!r} have different widths {sorted(values)}; "
                "fuse every layer to the same width, or keep the fused format (save_pretrained)"
            )
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    config = plain.config.get_text_config() if hasattr(plain.config, "get_text_config") else plain.config
    for key, values in widths.items():
        setattr(config, key, values.pop())
    if hasattr(plain, RECORD_ATTR):
        delattr(plain, RECORD_ATTR)
    plain.__dict__.pop("save_pretrained", None)  # the plain copy saves as any transformers model
    note = {
        "note": "Exported by mlp-fusion with the fixed scales folded into the weights: the same function as the "
        "fused model, but not its fine-tuning dynamics. Fine-tune the fused checkpoint instead.",
        "sites": [asdict(record) for record in fusion_records(model)],
    }
    return save_plain(plain, directory, tokenizer, overwrite=overwrite, notes={EXPORT_NOTE_FILE: note})


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    torch gives every parametrized module a generated subclass, and a deep copy shares it with the original;
    removing a parametrization deletes its property from that class, which would break the caller's model.
    """
    cls = module.__class__
    members = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, members)


def save_plain(
    model: nn.Module,
    directory: str | Path,
    tokenizer=None,
    *,
    overwrite: bool = False,
    notes: dict | None = None,
) -> Path:
    """Save an unfused model as a vanilla transformers checkpoint (atomically), with JSON ``notes`` files."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    return _atomic_directory(Path(directory), overwrite, write)


def check_writable(directory: str | Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``directory`` exists and may not be replaced."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(
            f"{directory} already exists; pass --overwrite (overwrite=True) or choose another directory"
        )
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; choose another output path")


def _atomic_directory(target: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then swap it in; a failure leaves ``target`` as it was."""
    check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target

"""Saving, loading and exporting fused models. Never pickle; every write is atomic.

A fused checkpoint is ``config.json`` of the base model, ``model.safetensors`` (stored weights and scale
buffers), tokenizer files when given, and ``fusion.json`` (what was fused and how). An export folds the
scales into the weights and is a plain checkpoint that vanilla ``transformers`` loads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import types
import uuid
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn
from torch.nn.utils import parametrize

from .errors import UserError, first_line
from .families import find_sites
from .fuse import RECORD_ATTR, SiteRecord, fusion_records
from .narrowing import attach_low_rank, attach_scale, use_compatible_experts_kernel
from .parametrizations import guard_against_plain_adapters, has_input_scales, plain_forward
from .recipes import RECIPE_ATTR, SAMPLES_FILE
from .sites import MlpSite

FORMAT_VERSION = 1
FUSION_FILE = "fusion.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_NOTE_FILE = "mlp_fusion_export.json"


def save_pretrained(
    model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False
) -> Path:
    """Save a fused model (and its tokenizer) to ``directory`` in the fused format."""
    _check_fused_format(model)
    return atomic_directory(Path(directory), overwrite, lambda tmp: _write_fused(model, tmp, tokenizer))


def _check_fused_format(model: nn.Module) -> None:
    """Refuse a model whose scales act on inputs (LoRA attached): its tensors are not the fused format's."""
    if has_input_scales(model):
        raise UserError(
            "this model carries LoRA adapters: merge them first (mlp_fusion.merge_lora), then save or export"
        )


def follow_native_save(model: nn.Module) -> None:
    """Make the model's own ``save_pretrained`` (transformers', which the Trainer calls too) write the fused
    format into the directory, as that method writes its files, instead of a checkpoint that loads wrong.
    :func:`mlp_fusion.fuse` calls it on every model it fuses, :func:`from_pretrained` on every model it loads."""

    def native_save(self: nn.Module, save_directory: str | Path, *args, **kwargs) -> None:
        _check_fused_format(self)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_fused(self, directory, None)

    if hasattr(model, "save_pretrained"):
        model.save_pretrained = types.MethodType(native_save, model)


def _write_fused(model: nn.Module, directory: Path, tokenizer) -> None:
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_description(model, directory, tokenizer)


def write_description(model: nn.Module, directory: Path, tokenizer) -> None:
    """Everything of a fused checkpoint but its tensors: configs, tokenizer, ``fusion.json``."""
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
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is not None:
        fusion["recipe"] = {key: value for key, value in recipe.items() if key != "samples"}
        if recipe.get("samples"):
            (directory / SAMPLES_FILE).write_text("\n".join(recipe["samples"]) + "\n")
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / FUSION_FILE).write_text(json.dumps(fusion, indent=2) + "\n")


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
    guard_against_plain_adapters(model, [record.name for record in fusion_records(model)])
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
    return model, list(sites.values())


def meta_model(build: Callable, config, dtype: torch.dtype, directory: Path) -> nn.Module:
    """``build(config)`` on the meta device (shapes only, no storage) in ``dtype``, with the generation
    config ``directory`` holds."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as transformers builds it: derived buffers get the dtypes it gives them
    try:
        with torch.device("meta"):
            model = build(config)
    finally:
        torch.set_default_dtype(default)
    derived = _derived_buffers(model)
    model.to(dtype)
    for module, name, buffer in derived:  # rotary frequencies stay float32, as in a loaded model
        module._buffers[name] = module._buffers[name].to(buffer.dtype)
    if (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` and the like -> the torch dtype; anything else is refused."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: ``model.safetensors``, or the shards its index names."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise UserError(f"{single} is missing; the checkpoint is incomplete, save it again")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{index} is damaged; save the model again") from None
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory / missing[0]} is missing; the checkpoint is incomplete, save it again")
    return [directory / name for name in names]


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


def shared_names(model: nn.Module) -> list[list[str]]:
    """Names under which one parameter appears more than once (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _derived_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The buffers checkpoints do not store (rotary frequencies, position ids, embedding scales)."""
    return [
        (module, name, module._buffers[name])
        for module in model.modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]


def materialise_derived_buffers(
    model: nn.Module, device: torch.device, modules: list[nn.Module] | None = None
) -> None:
    """Buffers that checkpoints do not store are computed, not loaded: give those of ``modules`` (default:
    all) storage and let the model's own initialiser fill them. Their owners' parameters are still on the
    meta device here, so whatever it does to them is discarded when the stored tensors arrive."""
    chosen = None if modules is None else {id(module) for module in modules}
    owners = []
    for module, name, buffer in _derived_buffers(model):
        if chosen is None or id(module) in chosen:
            module._buffers[name] = torch.empty_like(buffer, device=device)
            owners.append(module)
    with torch.no_grad():
        for module in dict.fromkeys(owners):
            model._init_weights(module)


def _load_stored_tensors(model: nn.Module, files: list[Path], device: torch.device) -> None:
    """Put every stored tensor in place (cast to the dtype the model holds it in), then tie shared weights."""
    expected = model.state_dict()
    state = {}
    try:
        for path in files:
            with safe_open(str(path), framework="pt", device=str(device)) as stored:
                for key in stored.keys():
                    if key in expected:
                        state[key] = aligned(stored.get_tensor(key).to(expected[key].dtype))
                    else:
                        state[key] = None
    except (SafetensorError, RuntimeError, OSError) as error:
        raise UserError(
            f"cannot load {files[0].parent}: {first_line(error)}; the file is damaged, save it again"
        ) from None
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


ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when its storage does not start on a 64-byte boundary.

    safetensors hands out tensors at the file's 8-byte offsets; matrix kernels take other code paths on such
    storage, so a loaded model would differ from the one saved in the last bits (and run slower).
    """
    return tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor


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
    widths = export_widths(model)
    plain = folded_copy(model)
    set_widths(plain.config, widths)
    return save_plain(plain, directory, tokenizer, overwrite=overwrite, notes=export_notes(model))


def folded_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a fused model: scales and factors folded into the weights, the caller's model intact.

    It computes the same function with the stock modules only (any widths; :func:`export` also needs one
    width per config field to save it).
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
            plain_forward(module)
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(plain, RECORD_ATTR):
        delattr(plain, RECORD_ATTR)
    plain.__dict__.pop("save_pretrained", None)  # the plain copy saves as any transformers model
    return plain


def export_widths(model: nn.Module) -> dict[str, int]:
    """The width each MLP config field takes in an export; refused unless every MLP it sets has one width."""
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
    return {key: values.pop() for key, values in widths.items()}


def set_widths(config: transformers.PretrainedConfig, widths: dict[str, int]) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, width in widths.items():
        setattr(text, key, width)


def export_notes(model: nn.Module) -> dict[str, dict]:
    """The note file an export carries next to its weights."""
    note = {
        "note": "Exported by mlp-fusion with the fixed scales folded into the weights: the same function as the "
        "fused model, but not its fine-tuning dynamics. Fine-tune the fused checkpoint instead.",
        "sites": [asdict(record) for record in fusion_records(model)],
    }
    return {EXPORT_NOTE_FILE: note}


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

    return atomic_directory(Path(directory), overwrite, write)


def check_writable(directory: str | Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``directory`` exists and may not be replaced."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(
            f"{directory} already exists; pass --overwrite (overwrite=True) or choose another directory"
        )
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; choose another output path")


def atomic_directory(target: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then swap it in; a failure leaves ``target`` as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted(target)
    check_writable(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def clean_interrupted(target: Path) -> None:
    """Remove what a killed write of ``target`` left: its unfinished temporary sibling, and the previous
    version it was replacing (put back when the swap did not finish). Another live process's are kept."""
    for leftover in sorted(target.parent.glob(f".{target.name}.*-*")):
        kind, _, rest = leftover.name.removeprefix(f".{target.name}.").partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            leftover.rename(target)  # the swap stopped between its two renames: the old version is back
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""The ground floor of every checkpoint this library reads or writes: the safetensors files of a checkpoint,
dtype names, the meta-device model skeleton and its derived buffers, aligned tensors, and writing a
directory atomically (a killed write leaves nothing that looks finished, and the next run cleans it up).
Nothing here knows about fusion."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from .errors import UserError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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


def folder_stamp(directory: Path) -> str:
    """A short digest of the names, sizes and modification times of the files in ``directory``: it changes
    when a checkpoint is written again there, without reading gigabytes of weights."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def named_classes(config) -> list[type]:
    """The transformers model classes the config's ``architectures`` name (those transformers has)."""
    names = getattr(config, "architectures", None) or []
    return [getattr(transformers, name) for name in names if hasattr(transformers, name)]


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


ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when its storage does not start on a 64-byte boundary.

    safetensors hands out tensors at the file's 8-byte offsets; matrix kernels take other code paths on such
    storage, so a loaded model would differ from the one saved in the last bits (and run slower).
    """
    return tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor


def write_side_files(
    directory: Path, model: nn.Module, tokenizer=None, notes: dict | None = None, *, configs: bool = True
) -> None:
    """Everything a checkpoint holds beside its tensors: the config and generation config (unless
    ``configs`` is False: transformers' own save wrote them), the tokenizer, and JSON ``notes`` files
    (name -> content)."""
    if configs:
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, content in (notes or {}).items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def check_writable(directory: str | Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Fail early, before any work, when ``directory`` exists and may not be replaced: without
    ``overwrite``, or (even with it) when it is not empty and holds no checkpoint, so that a mistyped
    ``--out`` never replaces a folder of the user's; nor when it is, or holds, the model being read
    (``source``), which the write would replace by its own compressed copy."""
    directory = Path(directory)
    check_parents(directory)
    check_not_source(directory, source)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; choose another output path")
    if directory.exists() and not overwrite:
        raise UserError(
            f"{directory} already exists; pass --overwrite (overwrite=True) or choose another directory"
        )
    if directory.exists() and not _replaceable(directory):
        raise UserError(
            f"{directory} holds more than a model checkpoint (config, weights and their side files, no folder), so "
            "--overwrite will not replace it; choose another directory"
        )


def check_parents(target: Path) -> None:
    """Refuse a path under a file: no folder can be made there."""
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent} is a file, so {target} cannot be written; choose another path")


def check_not_source(directory: Path, source: str | Path | None) -> None:
    """Refuse an output folder that is, or holds, the model being read (``source``; None or a hub id: no
    check): replacing it would delete the original, even the files a layer-by-layer write still reads."""
    if source is None or not Path(source).exists():
        return
    out, read = directory.resolve(), Path(source).resolve()
    if out == read or out in read.parents:
        raise UserError(
            f"{directory} holds the model being read ({source}), which writing there would replace; "
            "choose another directory"
        )


CHECKPOINT_MARKERS = ("config.json", "fusion.json")  # with weights beside one of these: a checkpoint
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What a checkpoint (or a run of this library) holds beside its weights: configs, tokenizer files, chat
# templates, notes, a model card. A file of any other kind (source code, an archive) is the user's.
CHECKPOINT_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".jsonl", ".txt", ".model", ".jinja", ".md", ".gguf")


def only_checkpoint_files(directory: Path, folders: Callable[[str], bool] = lambda name: False) -> bool:
    """Every entry of ``directory`` is a file of a kind a checkpoint holds, or a folder ``folders``
    accepts by name."""
    return all(
        folders(entry.name)
        if entry.is_dir()
        else entry.suffix in CHECKPOINT_SUFFIXES or entry.name == ".gitattributes"
        for entry in directory.iterdir()
    )


def _replaceable(directory: Path) -> bool:
    """An empty folder, or a checkpoint alone: a config with weights beside it, no folder inside, and no
    file of a kind a checkpoint never holds (anything else is a project of the user's)."""
    entries = list(directory.iterdir())
    names = {entry.name for entry in entries}
    weights = any(entry.suffix in WEIGHT_SUFFIXES for entry in entries)
    checkpoint = weights and any(name in names for name in CHECKPOINT_MARKERS)
    return not entries or (checkpoint and only_checkpoint_files(directory))


def atomic_directory(target: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then swap it in; a failure leaves ``target`` as it was.

    Every check comes before anything is removed: the leftovers of this library's own killed writes are
    cleaned only once the write may go ahead.
    """
    check_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(target)
    check_writable(target, overwrite)
    _remove_dead_leftovers(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = _sibling(target, "old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def atomic_file(target: Path, overwrite: bool, write: Callable[[Path], None], magic: bytes) -> Path:
    """Write one file through a temporary sibling renamed over ``target`` at the end; a failure leaves
    ``target`` as it was. With ``overwrite`` only a file that starts with ``magic`` (one of the kind being
    written) is replaced, so a mistyped path never replaces a file of the user's."""
    check_writable_file(target, overwrite, magic)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(target)
    tmp = _sibling(target, "tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_writable_file(target: Path, overwrite: bool, magic: bytes) -> None:
    """Fail early, before any work, when the file ``target`` exists and may not be replaced."""
    check_parents(target)
    if target.is_dir():
        raise UserError(f"{target} is a directory; give the path of a file to write")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite (overwrite=True) or choose another path")
    if target.exists():
        with open(target, "rb") as handle:
            if handle.read(len(magic)) != magic:
                raise UserError(
                    f"{target} is not a file this command writes, so --overwrite will not replace it; "
                    "choose another path"
                )


# This library's temporary siblings: ``.NAME.tmp-HOST-PID-RANDOM`` while writing, ``.NAME.old-...`` while
# swapping. HOST (a hash of the host name) keeps a writer on another machine sharing the disk from looking
# dead to a local process check; any other name, however close, is not ours and is never touched.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _dead_leftovers(target: Path) -> list[tuple[str, Path]]:
    """(kind, path) of every temporary sibling of ``target`` that a killed write on this host left."""
    found = []
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        match = _LEFTOVER.fullmatch(path.name)
        if match and match["name"] == target.name and match["host"] == _host():
            if not _alive(int(match["pid"])):
                found.append((match["kind"], path))
    return found


def restore_interrupted(target: Path) -> None:
    """Put back the previous version of ``target`` when a killed write stopped between its two renames."""
    if target.exists():
        return
    for kind, path in _dead_leftovers(target):
        if kind == "old":
            path.rename(target)
            return


def _remove_dead_leftovers(target: Path) -> None:
    """Remove what killed writes of ``target`` on this host left (after :func:`restore_interrupted`)."""
    for _, path in _dead_leftovers(target):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

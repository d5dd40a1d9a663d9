"""Recipes: what ``compress`` and ``finetune`` do when only a model, layers and a ratio are given.

``paper`` is the paper's data-free fusion, exactly as :func:`mlp_fusion.fuse` with the given config.
``calibrated`` (the default for causal language models) fuses with calibration inputs, keeps half of each
fused width as the top-scored neurons and refits with ridge weight 1. Measured on SmolLM2 and Gemma-3
(BENCHMARKS.md) it is far ahead of ``paper`` before and after fine-tuning; calibrated pruning is level with
it or ahead on SmolLM2 before fine-tuning, behind on Gemma-3. Calibration inputs come from a file or the
task when there are any; otherwise they are sampled from the model itself (seeded), so no data is needed,
and the samples are written next to the checkpoint. Encoders keep ``paper``: plain fusion measures best on
SST-2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from torch import nn

from .batches import position_limit
from .config import FusionConfig
from .errors import UserError
from .methods import METHODS
from .sampling import sample_ids

RECIPE_ATTR = "mlp_fusion_recipe"  # the recipe a model was compressed with, written into fusion.json
SAMPLES_FILE = "calibration-samples.txt"  # sampled calibration texts, one per line, next to the checkpoint


@dataclass(frozen=True)
class Sampling:
    """How calibration texts are drawn from the model itself: from its BOS token, nucleus sampling, seeded."""

    count: int = 128
    new_tokens: int = 96
    top_p: float = 0.95
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 128  # rows decoded together: larger batches measured faster on a 2-core CPU
    # the precision the sampler decodes in (the model's own: None); a bfloat16 copy of the weights multiplies
    # about 3x faster than float32 on a 2-core AVX-512 CPU, and its next-token distributions stay close
    dtype: str | None = "bfloat16"


@dataclass(frozen=True)
class Recipe:
    name: str
    keep_fraction: float  # for the clustering methods, unless a keep fraction is given
    calibrate: bool  # fuse with calibration inputs (sampled from the model when none are given)
    ridge: float | None = None  # the refit's ridge weight unless one is given (None: FusionConfig's)
    sampling: Sampling = field(default_factory=Sampling)


RECIPES = {
    "paper": Recipe("paper", keep_fraction=0.0, calibrate=False),
    # a stronger pull of the refit toward the method's weights measured better on SmolLM2 and Gemma-3
    "calibrated": Recipe("calibrated", keep_fraction=0.5, calibrate=True, ridge=1.0),
}
RECIPE_FIELDS = ("keep_fraction", "ridge")  # the FusionConfig fields a recipe fills in when not given
RECIPE_CHOICES = ("auto", *RECIPES)


def choose_recipe(name: str, config: transformers.PretrainedConfig) -> Recipe:
    """``auto``: ``calibrated`` for a causal language model, ``paper`` for anything else."""
    if name == "auto":
        return RECIPES["calibrated" if is_causal_lm(config) else "paper"]
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPE_CHOICES)}")
    return RECIPES[name]


def source_config(source: str | Path, path: Path | None) -> transformers.PretrainedConfig:
    """A model's config, read before the model is loaded (``path``: its directory, None for a hub id); an
    empty one when it cannot be read, so that loading says why."""
    try:
        return transformers.AutoConfig.from_pretrained(path if path is not None else str(source))
    except (OSError, ValueError):
        return transformers.PretrainedConfig()


def is_causal_lm(config: transformers.PretrainedConfig) -> bool:
    """Whether the checkpoint's architecture is a decoder-only language model (its head included)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    return any(is_causal_lm_class(name) for name in getattr(config, "architectures", None) or [])


def is_causal_lm_class(name: str) -> bool:
    """Whether a transformers model class name is a causal language model (``LlamaForCausalLM``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name in ([names] if isinstance(names, str) else names):
            return True
    return False


def apply_recipe(recipe: Recipe, given: dict) -> dict:
    """The FusionConfig fields of a run: those ``given`` that are not None, and for the
    :data:`RECIPE_FIELDS` not given the recipe's (its keep fraction only for the methods that keep neurons;
    its ridge weight when it has one, else FusionConfig's)."""
    fields = {name: value for name, value in given.items() if value is not None}
    method = METHODS.get(fields.get("method", FusionConfig.method))  # an unknown one: FusionConfig says so
    chosen = {"keep_fraction": recipe.keep_fraction if method is not None and method.clusters else 0.0}
    if recipe.ridge is not None:
        chosen["ridge"] = recipe.ridge
    return {**chosen, **fields}


def sample_texts(model: nn.Module, tokenizer, sampling: Sampling) -> list[str]:
    """``sampling.count`` texts generated by ``model`` from its BOS token, one line each (newlines become
    spaces, so the file written from them reads back as the same texts); empty samples are dropped.

    Only ``sampling`` decides how they are drawn (:mod:`mlp_fusion.sampling`): the model's own generation
    config (a temperature, a repetition penalty) plays no part, so the record in ``fusion.json`` says all
    that mattered.
    """
    start, end = _token_id(model, tokenizer, "bos"), _token_id(model, tokenizer, "eos")
    if start is None and end is None:
        raise UserError("sampling calibration texts needs a BOS or EOS token id; give --calibration FILE")
    start = start if start is not None else end
    device = next(model.parameters()).device
    texts: list[str] = []
    was_training = model.training
    model.eval()
    sampler = in_dtype(model, sampling.dtype)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            for first in range(0, sampling.count, sampling.batch_size):
                rows = min(sampling.batch_size, sampling.count - first)
                ids = sample_ids(
                    sampler, start, end, rows, sampling.new_tokens, sampling.top_p, sampling.temperature
                )
                for text in tokenizer.batch_decode(ids, skip_special_tokens=True):
                    line = " ".join(text.split())
                    if line:
                        texts.append(line)
    finally:
        model.train(was_training)
    if not texts:
        raise UserError("the model produced only empty samples; give --calibration FILE")
    return texts


def in_dtype(model: nn.Module, dtype: str | None) -> nn.Module:
    """``model`` with its weights in ``dtype``: itself when they already are (or ``dtype`` is None), else a
    copy (the weights' memory once more at that precision, while the copy lives). Buffers keep their
    precision: rotary frequencies rounded to bfloat16 would turn late positions by a visible angle."""
    wanted = getattr(torch, dtype) if dtype is not None else None
    if wanted is None or all(p.dtype == wanted for p in model.parameters() if p.is_floating_point()):
        return model
    copied = copy.deepcopy(model)
    for parameter in copied.parameters():  # tied weights are one parameter, converted once
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(wanted)
    return copied


def _token_id(model: nn.Module, tokenizer, kind: str) -> int | None:
    """The model's BOS or EOS id: the tokenizer's, else its generation config's, else its config's."""
    for owner in (tokenizer, getattr(model, "generation_config", None), model.config):
        value = getattr(owner, f"{kind}_token_id", None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int):
            return value
    return None


def fitted_sampling(sampling: Sampling, model: nn.Module) -> Sampling:
    """``sampling`` with no more new tokens than the model's positions hold after the start token."""
    limit = position_limit(model)
    if limit is None or sampling.new_tokens < limit:
        return sampling
    if limit < 2:
        raise UserError(f"the model has {limit} position(s): too few to sample calibration texts")
    return replace(sampling, new_tokens=limit - 1)


def record(model: nn.Module, recipe: Recipe, calibration: dict | None, texts: list[str] | None) -> None:
    """Attach what the recipe did to ``model``, for ``fusion.json`` (and the samples file) when it is saved."""
    if calibration is not None and "max_length" in calibration:
        limit = position_limit(model)  # longer calibration inputs are cut to it (fuse.py)
        calibration = {**calibration, "max_length": min(calibration["max_length"], limit or math.inf)}
    setattr(model, RECIPE_ATTR, {"name": recipe.name, "calibration": calibration, "samples": texts})


def sampled_calibration(sampling: Sampling, max_length: int, samples: int) -> dict:
    return {
        "source": "sampled",
        "file": SAMPLES_FILE,
        "max_length": max_length,
        "texts": samples,
        **asdict(sampling),
    }

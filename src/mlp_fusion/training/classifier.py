"""Sequence classifiers for fine-tuning: a base model with a new head, or a saved (fused) checkpoint.

A fused checkpoint of a bare encoder (``BertModel``) or of a language model keeps its fused body and its
fusion records when it is given a classification head here, so it fine-tunes and saves as a fused model.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import transformers
from torch import nn

from ..errors import UserError, first_line
from ..families import find_sites
from ..loading import (
    LoadedModel,
    LoadSettings,
    is_fused,
    load_fused,
    load_tokenizer,
    resolve,
    transformers_options,
    with_pad_token,
)
from ..records import RECORD_ATTR, fusion_records
from .tasks import Task


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def load_classifier(
    spec: str, task: Task, *, seed: int = 0, settings: LoadSettings | None = None
) -> LoadedModel:
    """``spec`` as a classifier for ``task``: the head is new unless the checkpoint has one that fits."""
    path = resolve(spec)
    source = str(path) if path is not None else spec
    transformers.set_seed(seed)  # the new head's initial weights
    options = transformers_options(settings)
    if path is not None and is_fused(path):
        model = load_fused(path, settings)
        if not (is_classifier(model) and model.config.num_labels == task.num_labels):
            model = with_new_head(model, task)
    else:
        model = _pretrained_classifier(source, task, options)
    tokenizer = load_tokenizer(path if path is not None else spec)
    return LoadedModel(with_pad_token(model, tokenizer, source), tokenizer, source)


def load_trained_classifier(spec: str, settings: LoadSettings | None = None) -> LoadedModel:
    """A fine-tuned classifier as saved, for evaluation: refuses a model without a trained head."""
    path = resolve(spec)
    source = str(path) if path is not None else spec
    options = transformers_options(settings)
    if path is not None and is_fused(path):
        model = load_fused(path, settings)
    else:
        try:
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                source, output_loading_info=True, **options
            )
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load {source} as a classifier: {first_line(error)}") from None
        if info["missing_keys"]:
            model = None
    if model is None or not is_classifier(model):
        raise UserError(
            f"{source} has no trained classification head; fine-tune it first (mlp-fusion finetune)"
        )
    tokenizer = load_tokenizer(path if path is not None else spec)
    return LoadedModel(with_pad_token(model.eval(), tokenizer, source), tokenizer, source)


def with_new_head(model: nn.Module, task: Task) -> nn.Module:
    """A classifier for ``task`` whose body is ``model``'s (fused) body, with its fusion records."""
    body = model.base_model
    old_prefix = "" if body is model else model.base_model_prefix
    config = copy.deepcopy(model.config)
    _set_labels(config, task)
    try:
        classifier = transformers.AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise UserError(
            f"{type(model).__name__} has no sequence-classification variant in transformers"
        ) from None
    prefix = classifier.base_model_prefix
    if type(getattr(classifier, prefix, None)) is not type(body):
        raise UserError(
            f"cannot put a classification head on {type(model).__name__}: its body does not match"
        )
    setattr(classifier, prefix, body.to(next(classifier.parameters()).dtype))
    records = [
        replace(
            record,
            name=f"{prefix}.{record.name.removeprefix(old_prefix + '.') if old_prefix else record.name}",
        )
        for record in fusion_records(model)
    ]
    names = {site.name for site in find_sites(classifier)}
    if any(record.name not in names for record in records):
        raise UserError(f"cannot put a classification head on {type(model).__name__}: its MLPs move")
    setattr(classifier, RECORD_ATTR, records)
    return classifier.eval()


def _pretrained_classifier(source: str, task: Task, options: dict) -> nn.Module:
    config_options = {"num_labels": task.num_labels}
    if task.labels is not None:
        config_options["id2label"] = dict(enumerate(task.labels))
        config_options["label2id"] = {name: i for i, name in enumerate(task.labels)}
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            source, ignore_mismatched_sizes=True, **options, **config_options
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load {source} as a sequence classifier: {first_line(error)}") from None
    return model.eval()


def _set_labels(config, task: Task) -> None:
    config.num_labels = task.num_labels
    if task.labels is not None:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {name: i for i, name in enumerate(task.labels)}
    config.problem_type = None  # chosen from the labels' dtype at the first batch

"""Causal-LM fine-tuning data and scoring for data-to-text tasks (WebNLG, E2E, DART, text pairs).

Training pairs every input with each of its references (loss on the reference tokens only); scoring
decodes one output per input (greedy, or beam search) and compares it with all of its references.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .data import check_counts, find_split
from .data2text import Item, format_example
from .subsets import EVAL_SEED, stratified_indices
from .tasks import GenerationTask, TaskOptions
from .text_metrics import generation_scores

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


@dataclass
class GenerationData:
    task: str
    train: list[Item] | None
    eval: list[Item]

    def train_pairs(self) -> list[tuple[str, str]]:
        return [(item.source, ref) for item in self.train or [] for ref in item.references]


def load_generation_data(
    task: GenerationTask, options: TaskOptions, need_train: bool = True
) -> GenerationData:
    """Training items (the first ``max_train_samples`` pairs' worth) and evaluation items of ``task``."""
    given = options.columns
    if {"--text-column", "--text-pair-column", "--label-column"} & set(given):
        raise UserError("--text-column, --text-pair-column and --label-column are for --task csv")
    wanted = {f"--{name.replace('_', '-')}" for name in task.columns}
    if not wanted <= set(given):
        raise UserError(f"--task {task.name} needs {' and '.join(sorted(wanted))}")
    if set(given) - wanted:
        raise UserError("--source-column and --target-column are for --task text2text")
    if options.data is None and options.train_file is None and options.eval_file is None:
        raise UserError(
            f"--task {task.name} needs --data DIR (train and dev files) or --train-file / --eval-file"
        )
    if options.data is not None and not options.data.is_dir():
        raise UserError(f"--data {options.data} is not a directory")
    check_counts(options.max_train_samples, options.max_eval_samples)
    train = None
    if need_train:
        train = task.read(options.train_file or _split(options, ("train",), "--train-file"), options)
        if options.max_train_samples is not None:
            train = _pairs(train, options.max_train_samples, options.sample, options.sample_seed)
    evaluation = task.read(
        options.eval_file or _split(options, ("dev", "validation"), "--eval-file"), options
    )
    if options.max_eval_samples is not None:
        evaluation = _items(evaluation, options.max_eval_samples, options.sample)
    return GenerationData(task.name, train, evaluation)


def _items(items: list[Item], count: int, sample: str) -> list[Item]:
    """The first ``count`` items, or ``count`` drawn at random keeping each stratum's share."""
    if sample == "first":
        return items[:count]
    return [items[i] for i in stratified_indices([item.stratum for item in items], count, EVAL_SEED)]


def _split(options: TaskOptions, stems: tuple[str, ...], option: str) -> Path:
    return find_split(options.data, stems, option, EXTENSIONS)


class PairDataset(torch.utils.data.Dataset):
    """(input, reference) pairs as prompt + target tokens, the prompt masked out of the labels."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, max_length: int):
        self.examples = [format_example(tokenizer, source, target, max_length) for source, target in pairs]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class PadCollator:
    """Right-pads a batch: input ids with the padding token, attention 0, labels -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        return {
            key: torch.tensor([e[key] + [value] * (longest - len(e[key])) for e in examples])
            for key, value in fill.items()
            if key in examples[0]
        }


def generate(
    model: nn.Module,
    tokenizer,
    sources: list[str],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 16,
    max_length: int = 256,
) -> list[str]:
    """One output text per input: prompts left-padded in batches, greedy unless ``num_beams`` > 1."""
    device = next(model.parameters()).device
    outputs = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sources), batch_size):
            prompts = [
                format_example(tokenizer, s, None, max_length)["input_ids"]
                for s in sources[start : start + batch_size]
            ]
            longest = max(len(p) for p in prompts)
            ids = torch.tensor(
                [[tokenizer.pad_token_id] * (longest - len(p)) + p for p in prompts], device=device
            )
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs += [
                t.strip() for t in tokenizer.batch_decode(generated[:, longest:], skip_special_tokens=True)
            ]
    model.train(was_training)
    return outputs


def score_generation(model: nn.Module, tokenizer, items: list[Item], **decoding) -> tuple[dict, list[dict]]:
    """Metrics over all items (and, for WebNLG, ``seen_`` / ``unseen_`` ones) and a record per item."""
    outputs = generate(model, tokenizer, [item.source for item in items], **decoding)
    metrics = generation_scores(outputs, [item.references for item in items])
    groups = {
        "seen_": [i for i, item in enumerate(items) if item.seen],
        "unseen_": [i for i, item in enumerate(items) if item.seen is False],
    }
    if all(groups.values()):  # both kinds present: the WebNLG test set
        for prefix, chosen in groups.items():
            part = generation_scores([outputs[i] for i in chosen], [items[i].references for i in chosen])
            metrics.update({prefix + name: value for name, value in part.items()})
    records = [
        {
            "index": item.index,
            "input": item.source,
            "output": output,
            "references": item.references,
            "category": item.category,
        }  # fmt: skip
        for item, output in zip(items, outputs)
    ]
    return metrics, records


def _pairs(items: list[Item], count: int, sample: str, seed: int) -> list[Item]:
    """Items holding ``count`` (input, reference) pairs: the leading ones (the last cut to fit), or pairs
    drawn at random keeping each stratum's share, grouped back by input."""
    pairs = [(position, reference) for position, item in enumerate(items) for reference in item.references]
    if sample == "first":
        chosen = range(min(count, len(pairs)))
    else:
        chosen = stratified_indices([items[position].stratum for position, _ in pairs], count, seed)
    kept: dict[int, list[str]] = {}
    for number in chosen:
        position, reference = pairs[number]
        kept.setdefault(position, []).append(reference)
    return [replace(items[position], references=references) for position, references in kept.items()]


def generation_inputs(data: GenerationData, tokenizer, max_length: int) -> dict:
    """The Trainer's datasets and collator; the per-epoch evaluation is the loss on each input's first reference."""
    if not data.train:
        raise UserError("fine-tuning needs a training split")
    eval_pairs = [(item.source, item.references[0]) for item in data.eval]
    return {
        "train_dataset": PairDataset(data.train_pairs(), tokenizer, max_length),
        "eval_dataset": PairDataset(eval_pairs, tokenizer, max_length),
        "data_collator": PadCollator(tokenizer.pad_token_id),
    }


def load_causal_lm(spec: str, settings=None, sharded: bool = False):
    """A decoder-only language model (base, fused or fine-tuned) with a tokenizer that can pad; ``settings``
    (a :class:`~mlp_fusion.loading.LoadSettings`) as for ``load_model``. ``sharded`` (under torchrun): a
    fused checkpoint is read already split across the processes (:func:`~.sharding.load_sharded`)."""
    from ..loading import load_model, with_pad_token
    from .sharding import load_fused_sharded

    loaded = (load_fused_sharded(spec, settings) if sharded else None) or load_model(spec, settings)
    model = loaded.model
    if getattr(model.config, "is_encoder_decoder", False) or not type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel")
    ):
        raise UserError(
            f"{loaded.source} is a {type(model).__name__}; data-to-text tasks need a decoder-only language model"
        )
    if loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {loaded.source} has no end-of-sequence token to end its outputs")
    with_pad_token(model, loaded.tokenizer, loaded.source)
    return loaded

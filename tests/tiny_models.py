"""Tiny models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import json

import torch
import transformers as tf

HIDDEN, WIDTH, LAYERS, VOCAB = 16, 24, 3, 64
_common = dict(
    hidden_size=HIDDEN,
    intermediate_size=WIDTH,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    vocab_size=VOCAB,
)
_decoder = dict(_common, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs() -> dict:
    return {
        "bert": (tf.BertConfig(**_common, max_position_embeddings=32), tf.BertModel),
        "roberta": (
            tf.RobertaConfig(**_common, max_position_embeddings=40),
            tf.RobertaForSequenceClassification,
        ),
        "mpnet": (tf.MPNetConfig(**_common, max_position_embeddings=40), tf.MPNetModel),
        "gpt2": (
            tf.GPT2Config(
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=32,
                bos_token_id=1,
                eos_token_id=2,
            ),
            tf.GPT2LMHeadModel,
        ),
        "llama": (tf.LlamaConfig(**_decoder), tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**_decoder), tf.Qwen2ForCausalLM),
        "gemma2": (tf.Gemma2Config(**_decoder), tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig(**_decoder), tf.Gemma3ForCausalLM),
        "mixtral": (
            tf.MixtralConfig(**_decoder, num_local_experts=4, num_experts_per_tok=2),
            tf.MixtralForCausalLM,
        ),
        "qwen2_moe": (
            tf.Qwen2MoeConfig(
                **_decoder,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=20,
                shared_expert_intermediate_size=28,
            ),
            tf.Qwen2MoeForCausalLM,
        ),
        "qwen3_moe": (
            tf.Qwen3MoeConfig(**_decoder, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=20),
            tf.Qwen3MoeForCausalLM,
        ),
        "switch": (
            tf.SwitchTransformersConfig(
                d_model=HIDDEN,
                d_ff=WIDTH,
                d_kv=8,
                num_layers=4,
                num_decoder_layers=4,
                num_heads=2,
                num_experts=4,
                vocab_size=VOCAB,
                encoder_sparse_step=2,
                decoder_sparse_step=2,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            ),
            tf.SwitchTransformersForConditionalGeneration,
        ),
    }


FAMILIES = sorted(_configs())


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config, cls = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # default inits can leave biases at zero; give every tensor some signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def duplicate_neurons(model: torch.nn.Module, symmetric: bool = False) -> int:
    """Make the second half of every MLP's neurons copies of the first half; returns the half width.

    With ``symmetric``, each copy is moved by a random exact symmetry of its MLP (gated: ``(u, d) ->
    (a u, d / a)`` with a random sign; ReLU: a positive ``a``), so it computes the same function.
    """
    from mlp_fusion import find_sites

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in find_sites(model):
            sub = site.read()
            half = sub.width // 2
            index = torch.arange(sub.width) % half
            copies = sub.map_rows(lambda t, index=index: t[:, index])
            if symmetric and site.symmetry != "none":
                factor = torch.ones(sub.batch, sub.width, 1)
                factor[:, half:] = torch.rand(sub.batch, sub.width - half, 1, generator=generator) * 1.5 + 0.5
                if site.symmetry == "gated":
                    signs = torch.randint(0, 2, factor.shape, generator=generator) * 2.0 - 1
                    factor[:, half:] *= signs[:, half:]
                inputs = [*copies.inputs[:-1], copies.inputs[-1] * factor]
                copies = copies.with_tensors(inputs, copies.output / factor)
            site.write(copies)
    return half


def inputs(seed: int = 0, batch: int = 2, length: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's main output tensor (logits or last hidden state) for ``batch``."""
    extra = {"decoder_input_ids": batch["input_ids"]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(**batch, **extra)[0]


POSITIVE = ("good", "great", "fine", "nice", "happy", "superb", "lovely", "bright")
NEGATIVE = ("bad", "awful", "poor", "sad", "ugly", "dull", "grim", "weak")
FILLERS = (
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "is",
    "was",
    "very",
    "quite",
    "story",
    "acting",
    "and",
    "it",
    "of",
)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NAMES = ("ana", "bo", "cy", "di")
FOODS = ("rice", "soup", "fish", "cake")
DATA_WORDS = (":", "|", "text", "name", "food", "area", "serves", "north", "south", "in")


def save_tokenizer(path) -> None:
    """A word-level BERT tokenizer over the synthetic tasks' words (ids below the tiny vocabulary size).

    Its [CLS] / [SEP] double as beginning / end of sequence, so decoders can use it too.
    """
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + POSITIVE + NEGATIVE + FILLERS + NAMES + FOODS + DATA_WORDS
    assert len(words) <= VOCAB
    tokenizer = tf.BertTokenizer(
        vocab={word: i for i, word in enumerate(words)}, bos_token="[CLS]", eos_token="[SEP]"
    )
    assert tokenizer("good film")["input_ids"] == [2, 5, 24, 3]
    tokenizer.save_pretrained(path)


def sentiment_rows(count: int, seed: int) -> list[tuple[str, int]]:
    """A learnable task: filler words around two sentiment words; the label is their polarity."""
    generator = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    rows = []
    for _ in range(count):
        label = int(torch.randint(2, (1,), generator=generator))
        words = [pick(FILLERS) for _ in range(int(torch.randint(1, 4, (1,), generator=generator)))]
        for _ in range(2):
            words.insert(
                int(torch.randint(len(words) + 1, (1,), generator=generator)),
                pick((NEGATIVE, POSITIVE)[label]),
            )
        rows.append((" ".join(words), label))
    return rows


def write_sentiment_task(directory, train: int = 256, dev: int = 64) -> None:
    """train.tsv / dev.tsv in the GLUE SST-2 format."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", train, 1), ("dev", dev, 2)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentiment_rows(count, seed)]
        (directory / f"{name}.tsv").write_text("\n".join(lines) + "\n")


def write_data_to_text_task(directory, train: int = 96, dev: int = 12) -> None:
    """A learnable text2text task in JSONL: 'name : ana | food : rice' -> 'ana serves rice food'."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name, count in (("train", train), ("dev", dev)):
        lines = []
        for _ in range(count):
            who, what = (
                NAMES[int(torch.randint(4, (1,), generator=generator))],
                FOODS[int(torch.randint(4, (1,), generator=generator))],
            )
            lines.append(
                json.dumps({"mr": f"name : {who} | food : {what}", "text": f"{who} serves {what} food"})
            )
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

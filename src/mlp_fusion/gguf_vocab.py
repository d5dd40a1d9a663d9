"""The tokenizer part of a GGUF file: a transformers byte-level BPE tokenizer written as llama.cpp's ``gpt2``
tokenizer, with the llama.cpp pre-tokenizer that splits text the way the transformers one does.

llama.cpp does not read a tokenizer's pre-tokenizer from the file: it picks one of its own built-in splitters
by name. A wrong name gives other token ids on some texts (digits, for instance) with no error, so only the
pre-tokenizers whose llama.cpp splitter is known (and tested) to match are accepted; anything else is refused.
"""

from __future__ import annotations

import json
import tempfile

from .errors import UserError

# transformers pre-tokenizer steps (the fields that decide the split) -> llama.cpp's name for the same split
PRE_TOKENIZERS = {
    "gpt-2": ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},),
    "smollm": (
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    ),
}


def add_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write ``tokenizer`` into the GGUF ``writer`` (ids padded to the model's ``vocab_size``); returns the
    llama.cpp pre-tokenizer name chosen."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    pre = pre_tokenizer_name(spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)  # the files gguf's reader of merges and special ids expects
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return pre


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("cannot export to GGUF: the tokenizer is not a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise UserError(
            "cannot export to GGUF: only byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3 style) are supported"
        )
    if spec.get("normalizer") is not None:
        raise UserError(
            "cannot export to GGUF: the tokenizer normalises text, which llama.cpp's gpt2 tokenizer does not"
        )
    return spec


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of ``spec`` (a tokenizer.json), or a one-line refusal."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for name, expected in PRE_TOKENIZERS.items():
        if len(steps) == len(expected) and all(
            all(step.get(key) == value for key, value in want.items()) for step, want in zip(steps, expected)
        ):
            return name
    kinds = "+".join(str(step.get("type")) for step in steps)
    raise UserError(
        f"cannot export to GGUF: llama.cpp has no splitter known to match this tokenizer's pre-tokenizer ({kinds})"
    )


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token string and llama.cpp token type, padded with unused entries up to ``vocab_size``."""
    import gguf

    size = len(tokenizer)
    if size > vocab_size:
        raise UserError(
            f"cannot export to GGUF: the tokenizer has {size} tokens, the model only {vocab_size}"
        )
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    types = [int(gguf.TokenType.NORMAL)] * size
    for index, added in tokenizer.added_tokens_decoder.items():
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        types[index] = int(kind)
    tokens += [f"[PAD{index}]" for index in range(size, vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - size)
    return tokens, types

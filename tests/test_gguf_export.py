"""GGUF export: a fused Llama written for llama.cpp with each layer at its own width, run by llama.cpp itself
(the ``serve`` extra, ``make serve``) and compared with the fused model in transformers."""

import json

import numpy as np
import pytest
import torch
import transformers

import mlp_fusion
from mlp_fusion import UserError
from mlp_fusion.gguf_vocab import pre_tokenizer_name

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2019, 1234 people visited the museum at 56 Elm Street.",
    "Alan Bean was a crew member of Apollo 12, operated by NASA!",
]


def byte_level_tokenizer(digits: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained here, with GPT-2's split (or SmolLM's: each digit alone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    steps = [pre_tokenizers.Digits(individual_digits=True), byte_level] if digits else [byte_level]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps) if digits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 20 + ["numbers 1234567890 and words"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def uneven_fused_llama(vocab_size: int = 400) -> torch.nn.Module:
    """A tiny Llama whose three MLPs end up 64, 128 (unfused) and 32 wide."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.5, layers=[0], seed=0))
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.25, layers=[2], seed=0))
    return model


def transformers_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_cpp_logits(path, ids: list[int], exact_cache: bool = True) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is the serve extra: run `make serve`")
    cache = {"type_k": 0, "type_v": 0} if exact_cache else {}  # float32 attention cache: nothing rounded
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False, **cache)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_cpp_tokens(path, text: str) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is the serve extra: run `make serve`")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=True, special=True)  # BOS only where the file asks for it


def test_float32_gguf_gives_the_fused_models_logits_in_llama_cpp_with_uneven_widths(tmp_path):
    model, tokenizer = uneven_fused_llama(), byte_level_tokenizer()
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [64, 128, 32]
    path = mlp_fusion.export(model, tmp_path / "model.gguf", tokenizer, format="gguf", gguf_type="f32")
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        want, got = transformers_logits(model, ids), llama_cpp_logits(path, ids)
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_float16_and_quantised_types_stay_within_stated_tolerances(tmp_path):
    model, tokenizer = uneven_fused_llama(), byte_level_tokenizer()
    ids = tokenizer(TEXTS[1])["input_ids"]
    want = transformers_logits(model, ids)
    for gguf_type, tolerance in (("f16", 0.01), ("q8_0", 0.05), ("q4_k_m", 0.25)):  # of the largest logit
        path = mlp_fusion.export(
            model, tmp_path / f"{gguf_type}.gguf", tokenizer, format="gguf", gguf_type=gguf_type
        )
        got = llama_cpp_logits(path, ids, exact_cache=False)
        assert np.abs(got - want).max() < tolerance * np.abs(want).max(), gguf_type
    sizes = {kind: (tmp_path / f"{kind}.gguf").stat().st_size for kind in ("f16", "q8_0", "q4_k_m")}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]


@pytest.mark.parametrize("digits", [False, True])
def test_llama_cpp_tokenizes_as_transformers_does(tmp_path, digits):
    model, tokenizer = uneven_fused_llama(), byte_level_tokenizer(digits=digits)
    path = mlp_fusion.export(model, tmp_path / "model.gguf", tokenizer, format="gguf", gguf_type="f16")
    for text in TEXTS + ["tab\tand  two spaces, 3.14159 and 2026-12-04<|endoftext|>"]:
        assert llama_cpp_tokens(path, text) == tokenizer(text)["input_ids"]


def test_a_pre_tokenizer_llama_cpp_has_no_match_for_is_refused():
    spec = json.loads(byte_level_tokenizer().backend_tokenizer.to_str())
    assert pre_tokenizer_name(spec) == "gpt-2"
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(UserError, match="no splitter"):
        pre_tokenizer_name(spec)


def test_refusals_write_nothing(tmp_path):
    from tiny_models import build

    tokenizer = byte_level_tokenizer()
    gemma = build("gemma3")
    with pytest.raises(UserError, match="one width for every layer"):
        mlp_fusion.export(gemma, tmp_path / "gemma.gguf", tokenizer, format="gguf")
    with pytest.raises(UserError, match="without a tokenizer"):
        mlp_fusion.export(uneven_fused_llama(), tmp_path / "bare.gguf", None, format="gguf")
    with pytest.raises(UserError, match="unknown GGUF type"):
        mlp_fusion.export(uneven_fused_llama(), tmp_path / "x.gguf", tokenizer, format="gguf", gguf_type="q3")
    with pytest.raises(UserError, match="unknown export format"):
        mlp_fusion.export(uneven_fused_llama(), tmp_path / "x", tokenizer, format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_fused_checkpoint_and_never_replaces_a_users_file(tmp_path, cli):
    model, tokenizer = uneven_fused_llama(), byte_level_tokenizer()
    mlp_fusion.save_pretrained(model, tmp_path / "fused", tokenizer=tokenizer)
    out = tmp_path / "model.gguf"
    code, stdout, _ = cli(
        "export", tmp_path / "fused", "--format", "gguf", "--gguf-type", "f32", "--out", out
    )
    assert code == 0 and "GGUF" in stdout and out.read_bytes()[:4] == b"GGUF"
    code, _, err = cli("export", tmp_path / "fused", "--format", "gguf", "--out", out)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = cli("export", tmp_path / "fused", "--format", "gguf", "--out", notes, "--overwrite")
    assert code == 2 and "not a file this command writes" in err and notes.read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fused", "model.gguf", "notes.txt"]
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert np.abs(llama_cpp_logits(out, ids) - transformers_logits(model, ids)).max() < 1e-3


@pytest.mark.slow
def test_fused_smollm2_runs_in_llama_cpp_with_its_own_widths_and_tokenizer(tmp_path):
    from mlp_fusion.loading import load_model

    loaded = load_model("smollm2")
    model, tokenizer = loaded.model, loaded.tokenizer
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.5, layers="20-29", seed=0))
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.25, layers="10-19", seed=0))
    path = mlp_fusion.export(model, tmp_path / "smollm2.gguf", tokenizer, format="gguf", gguf_type="f16")
    texts = TEXTS + ["Elliot See was born in Dallas and died in St. Louis; he was selected by NASA in 1962."]
    agree = total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert llama_cpp_tokens(path, text) == ids
        want, got = transformers_logits(model, ids), llama_cpp_logits(path, ids, exact_cache=False)
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"

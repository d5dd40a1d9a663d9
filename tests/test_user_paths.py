"""Paths a user meets that once handed back a wrong model, a traceback or a false record."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build, save_tokenizer


def refusal(code: int, err: str) -> str:
    """The one error line of a refused command (progress lines may come before it)."""
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _headless_llama(path) -> None:
    """An untied decoder saved without its output head."""
    model = build("llama")
    assert not model.config.tie_word_embeddings
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("where", [[], ["--in-memory"]])
def test_compress_refuses_a_decoder_without_its_head(tmp_path, cli, where):
    _headless_llama(tmp_path / "base")
    code, _, err = cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "out", *where)
    assert "lacks lm_head.weight" in refusal(code, err)
    assert not (tmp_path / "out").exists()


def test_an_encoder_without_its_pretraining_head_still_loads_bare(tmp_path, cli):
    """A sentence-embedding checkpoint whose config names a masked-LM class it has no head for."""
    model = build("mpnet")
    model.config.architectures = ["MPNetForMaskedLM"]
    model.save_pretrained(tmp_path / "base")
    code, _, err = cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["architecture"] == "MPNetModel"

"""Perplexity against a hand-computed value, and the perplexity command."""

import json
import math

import pytest
import torch
import transformers as tf
from tiny_models import build, save_tokenizer

from mlp_fusion import FusionConfig, fuse, save_pretrained
from mlp_fusion.diagnostics.perplexity import perplexity, text_losses

TEXTS = [
    "the movie was good",
    "a bad plot and dull acting",
    "fine",
    "the story is very nice and the film is great",
]


def hand_computed(model, tokenizer, texts):
    """One text at a time, no padding: the sum of -log p(token | the tokens before it)."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        for position in range(1, len(ids)):
            total -= float(logits[position - 1].log_softmax(-1)[ids[position]])
            count += 1
    return math.exp(total / count), count


def test_perplexity_matches_a_hand_computed_value(lm_dir):
    model = tf.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(lm_dir)
    expected, count = hand_computed(model, tokenizer, TEXTS)
    result = perplexity(model, tokenizer, TEXTS, batch_size=3)  # padded batches of unequal lengths
    assert result["tokens"] == count == sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_command_on_plain_and_fused_models(cli, lm_dir, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    code, stdout, _ = cli("perplexity", lm_dir, "--data", data, "--json")
    assert code == 0
    plain = json.loads(stdout)
    model = tf.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(lm_dir)
    assert plain["perplexity"] == pytest.approx(hand_computed(model, tokenizer, TEXTS)[0], rel=1e-6)

    fuse(model, FusionConfig(ratio=0.25))
    save_pretrained(model, tmp_path / "fused", tokenizer)
    code, stdout, _ = cli("perplexity", tmp_path / "fused", "--data", data, "--json", "--max-samples", "2")
    fused = json.loads(stdout)
    assert code == 0 and fused["texts"] == 2
    assert fused["perplexity"] == pytest.approx(hand_computed(model, tokenizer, TEXTS[:2])[0], rel=1e-6)
    import mlp_fusion  # the library verb: a file or a list of texts, as the command scores them

    assert mlp_fusion.perplexity(tmp_path / "fused", data, max_samples=2) == fused
    listed = mlp_fusion.perplexity(str(tmp_path / "fused"), TEXTS[:2])
    assert listed["data"] is None and listed["perplexity"] == fused["perplexity"]


@pytest.mark.parametrize(
    "texts, options, message",
    [
        ("one text", {}, "cannot read text file"),
        ([], {}, "non-empty list of strings"),
        ([1, 2], {}, "non-empty list of strings"),
        (TEXTS, {"batch_size": 0}, "--batch-size must be at least 1"),
        (TEXTS, {"max_length": None}, "--max-length must be at least 1"),
        (TEXTS, {"load": {"dtype": "float32"}}, "LoadSettings, got"),
    ],
    ids=["string-not-a-file", "no-texts", "not-strings", "batch-size", "no-max-length", "load-as-dict"],
)
def test_the_perplexity_verb_refuses_what_it_cannot_score_before_loading(
    lm_dir, monkeypatch, texts, options, message
):
    import mlp_fusion
    from mlp_fusion import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded before the refusal"))
    with pytest.raises(mlp_fusion.UserError, match=message):
        mlp_fusion.perplexity(lm_dir, texts, **options)


def test_perplexity_refuses_bad_input(cli, lm_dir, model_dir, tmp_path):
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(TEXTS))
    for args, message in [
        (("perplexity", lm_dir, "--data", tmp_path / "missing.txt"), "cannot read text file"),
        (("perplexity", lm_dir, "--data", text, "--max-length", "0"), "--max-length"),
        (("perplexity", model_dir, "--data", text), "tokenizer"),
    ]:
        code, stdout, stderr = cli(*args)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and stdout == "" and len(errors) == 1, args
        assert message in errors[0]
    save_tokenizer(tmp_path / "bert")
    build("bert").save_pretrained(tmp_path / "bert")
    code, _, stderr = cli("perplexity", tmp_path / "bert", "--data", text)
    assert code == 2 and "not a causal language model" in stderr


def test_a_masked_lm_is_refused(cli, tmp_path):
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(TEXTS))
    save_tokenizer(tmp_path / "mlm")
    tf.BertForMaskedLM(build("bert").config).save_pretrained(tmp_path / "mlm")
    code, stdout, stderr = cli("perplexity", tmp_path / "mlm", "--data", text)
    assert code == 2 and stdout == "" and "not a causal language model" in stderr


def test_texts_longer_than_the_position_limit_are_cut_to_it(cli, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(" ".join(["the movie was good"] * 30) + "\n" + TEXTS[0] + "\n")
    save_tokenizer(tmp_path / "gpt2")
    model = build("gpt2")
    limit = model.config.n_positions
    model.save_pretrained(tmp_path / "gpt2")
    code, stdout, stderr = cli("perplexity", tmp_path / "gpt2", "--data", text, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["max_length"] == limit and "position limit" in stderr
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert result["tokens"] == (limit - 1) + len(tokenizer(TEXTS[0])["input_ids"]) - 1


def test_text_losses_are_per_text_in_the_order_given(lm_dir):
    model = tf.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(lm_dir)
    losses, _ = text_losses(model, tokenizer, TEXTS, batch_size=3)  # sorted into batches by length
    assert len(losses) == len(TEXTS)
    for text, (nll, count) in zip(TEXTS, losses):
        expected, expected_count = hand_computed(model, tokenizer, [text])
        assert count == expected_count
        assert math.exp(nll / count) == pytest.approx(expected, rel=1e-6)

"""Healing after compression: the compressed model trained toward the original's next-token distributions."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build, inputs, save_tokenizer

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.training.distill import next_token_kl
from mlp_fusion.training.heal import HealSettings, heal

TEXTS = [
    " ".join(words)
    for words in (
        ("the", "movie", "was", "good", "and", "the", "plot", "was", "nice"),
        ("a", "film", "is", "quite", "dull", "and", "grim"),
        ("ana", "serves", "rice", "in", "the", "north"),
        ("bo", "serves", "fish", "food", "in", "the", "south"),
    )
    for _ in range(4)
]


@pytest.fixture
def pair(tmp_path):
    """A tiny LLaMA and its fused copy, with the word-level tokenizer of the tests."""
    from mlp_fusion.loading import load_tokenizer

    original = build("llama")
    with torch.no_grad():  # tiny random models are nearly linear: make the MLPs and the head matter
        for name, parameter in original.named_parameters():
            parameter.mul_(8 if ".mlp." in name else 30 if "lm_head" in name else 1)
    save_tokenizer(tmp_path / "tokenizer")
    fused = copy.deepcopy(original)
    fuse(fused, FusionConfig(ratio=0.25))
    return original, fused, load_tokenizer(tmp_path / "tokenizer")


def _kl(student, teacher) -> float:
    batch = inputs(seed=7, batch=4, length=9)
    with torch.no_grad():
        return float(next_token_kl(student(**batch).logits, teacher(**batch).logits, batch["attention_mask"]))


@pytest.mark.parametrize("train", ["all", "layers", "mlps"])
def test_healing_lowers_the_kl_to_the_original_and_keeps_the_scales(pair, train):
    original, fused, tokenizer = pair
    scales = {n: b.clone() for n, b in fused.named_buffers() if n.endswith("scale")}
    frozen = {n: p.clone() for n, p in fused.named_parameters() if "embed" in n}
    before = _kl(fused, original)
    done = heal(
        fused, original, tokenizer, TEXTS, HealSettings(heal_steps=30, heal_lr=3e-3, heal_train=train)
    )
    assert _kl(fused, original) < 0.9 * before  # held-out token ids, not the healing texts
    assert done["kl_last"] < done["kl_first"] and done["steps"] == 30 and done["train"] == train
    assert all(torch.equal(b, scales[n]) for n, b in fused.named_buffers() if n in scales)
    embeddings_moved = any(not torch.equal(p, frozen[n]) for n, p in fused.named_parameters() if n in frozen)
    assert embeddings_moved == (train == "all")
    assert all(p.requires_grad for p in fused.parameters())  # given back trainable


def test_healing_in_bfloat16_lowers_the_kl_and_keeps_float32_weights(pair):
    original, fused, tokenizer = pair
    before = _kl(fused, original)
    settings = HealSettings(heal_steps=30, heal_lr=3e-3, heal_precision="bfloat16")
    done = heal(fused, original, tokenizer, TEXTS, settings)
    assert _kl(fused, original) < 0.9 * before and done["precision"] == "bfloat16"
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    assert {p.dtype for p in original.parameters()} == {torch.float32}


def test_a_linear_schedule_falls_from_the_rate_to_zero(pair, monkeypatch):
    original, fused, tokenizer = pair
    seen = []
    step = torch.optim.AdamW.step

    def recording(optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    settings = HealSettings(heal_steps=4, heal_lr=2e-3, heal_schedule="linear")
    done = heal(fused, original, tokenizer, TEXTS, settings)
    assert seen == pytest.approx([2e-3, 1.5e-3, 1e-3, 0.5e-3]) and done["schedule"] == "linear"


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_a_stopped_heal_resumes_to_the_tensors_of_one_that_never_stopped(pair, tmp_path, schedule):
    original, fused, tokenizer = pair
    settings = HealSettings(heal_steps=60, heal_lr=3e-3, heal_batch_size=4, heal_schedule=schedule)
    whole = copy.deepcopy(fused)
    heal(whole, original, tokenizer, TEXTS, settings)

    class Stop(Exception):
        pass

    def stop_at_40(line):
        if "step 39/" in line or "step 42/" in line:
            raise Stop

    stopped = copy.deepcopy(fused)
    with pytest.raises(Stop):
        heal(stopped, original, tokenizer, TEXTS, settings, stop_at_40, tmp_path / "state")
    assert json.loads((tmp_path / "state" / "heal-state.json").read_text())["step"] == 25
    # a kill after the next tensors were written but before the JSON naming them: they must not be read
    save_file({"0.weight": torch.zeros(1)}, str(tmp_path / "state" / "heal-state-000050.safetensors"))
    resumed = copy.deepcopy(fused)  # a new process: the fused model again, then the saved state
    done = heal(resumed, original, tokenizer, TEXTS, settings, None, tmp_path / "state")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(json.loads((tmp_path / "state" / "heal-state.json").read_text())["kls"]) == 60
    assert done["kl_last"] is not None


@pytest.mark.parametrize("change", ["another compression", "other texts"])
def test_a_state_left_by_another_model_or_other_texts_is_never_resumed(pair, tmp_path, change):
    original, fused, tokenizer = pair
    settings = HealSettings(heal_steps=30, heal_lr=3e-3, heal_batch_size=4)

    class Stop(Exception):
        pass

    def stop_at_27(line):
        if "step 27/" in line:
            raise Stop

    with pytest.raises(Stop):  # a killed heal leaves its state at step 25
        heal(copy.deepcopy(fused), original, tokenizer, TEXTS, settings, stop_at_27, tmp_path / "state")
    student, texts = copy.deepcopy(fused), TEXTS
    if change == "another compression":  # the same shapes and healing settings: only the weights differ
        student = copy.deepcopy(original)
        fuse(student, FusionConfig(ratio=0.25, seed=1))
    else:
        texts = TEXTS[::-1]
    fresh = copy.deepcopy(student)
    heal(fresh, original, tokenizer, texts, settings)
    heal(student, original, tokenizer, texts, settings, None, tmp_path / "state")
    for (name, a), b in zip(fresh.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name


def test_compress_heals_records_it_and_removes_its_state(tmp_path, cli):
    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    code, _, err = cli(
        "compress", tmp_path / "base", "--ratio", "0.5", "--recipe", "paper", "--heal-steps", "10",
        "--heal-data", tmp_path / "texts.txt", "--heal-lr", "1e-3", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "healing needs the whole model" in err and "heal: step 10/10" in err
    healed = json.loads((out / "fusion.json").read_text())["recipe"]["heal"]
    assert (healed["steps"], healed["texts"], healed["source"], healed["lr"]) == (10, 16, "given", 1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "texts.txt"]  # no state left
    code, shown, _ = cli("info", out)
    assert code == 0 and "healed: 10 steps on 16 given texts" in shown


def test_compress_samples_healing_texts_from_the_original_by_default(tmp_path, cli):
    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    code, _, err = cli(
        "compress", tmp_path / "base", "--ratio", "0.5", "--heal-steps", "3", "--heal-texts", "12",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    healed = json.loads((tmp_path / "out" / "fusion.json").read_text())["recipe"]["heal"]
    assert healed["source"] == "sampled" and 0 < healed["texts"] <= 12


@pytest.mark.parametrize(
    "family, tokenizer, message",
    [("bert", True, "causal language model"), ("llama", False, "tokenizer")],
)
def test_healing_refuses_an_encoder_and_a_model_without_tokenizer(tmp_path, cli, family, tokenizer, message):
    build(family).save_pretrained(tmp_path / "base")
    if tokenizer:
        save_tokenizer(tmp_path / "base")
    code, _, err = cli("compress", tmp_path / "base", "--heal-steps", "5", "--out", tmp_path / "out")
    assert code == 2 and err.count("error:") == 1 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value",
    [("--heal-steps", "-1"), ("--heal-lr", "0"), ("--heal-batch-size", "0"), ("--heal-schedule", "cosine")],
)
def test_bad_healing_settings_are_refused_with_one_line(tmp_path, cli, option, value):
    code, _, err = cli("compress", "--heal-steps", "5", option, value, "--out", tmp_path / "out")
    assert code == 2 and err.count("error:") == 1 and option in err


@pytest.mark.parametrize(
    "option, value", [("--heal-lr", "1e-3"), ("--heal-train", "mlps"), ("--heal-texts", "50")]
)
def test_a_healing_setting_without_heal_steps_is_refused(tmp_path, cli, option, value):
    build("llama").save_pretrained(tmp_path / "base")
    code, _, err = cli(
        "compress", tmp_path / "base", "--ratio", "0.5", option, value, "--out", tmp_path / "out"
    )
    assert code == 2 and err.strip().endswith(f"{option} sets up healing: add --heal-steps N")
    assert not (tmp_path / "out").exists()

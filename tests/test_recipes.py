"""Recipes: the calibrated default for causal LMs (recorded, reproducible), the paper's fusion one flag away."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build, save_tokenizer

from mlp_fusion import FusionConfig, from_pretrained, fuse
from mlp_fusion.cli import main
from mlp_fusion.persistence import FUSION_FILE, placeholders
from mlp_fusion.recipes import RECIPES, SAMPLES_FILE
from mlp_fusion.records import fusion_records

CALIBRATED_RIDGE = RECIPES["calibrated"].ridge


def compress(capsys, *args):
    code = main(["compress", *[str(a) for a in args], "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def tensors(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture
def decoder_dir(tmp_path):
    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    return tmp_path / "base"


def test_default_on_a_causal_lm_samples_calibration_keeps_neurons_and_records_it(
    capsys, tmp_path, decoder_dir
):
    result, stderr = compress(capsys, decoder_dir, "--ratio", "0.5", "--out", tmp_path / "a")
    # a local checkpoint: the model is loaded whole to sample, then fused layer by layer
    assert result["recipe"] == "calibrated" and result["streamed"]
    assert "sampling 128 calibration texts" in stderr and "layer by layer" in stderr
    fusion = json.loads((tmp_path / "a" / FUSION_FILE).read_text())
    assert fusion["recipe"]["name"] == "calibrated"
    recorded = fusion["recipe"]["calibration"]
    assert recorded["source"] == "sampled" and recorded["file"] == SAMPLES_FILE
    assert (recorded["count"], recorded["new_tokens"], recorded["top_p"]) == (128, 96, 0.95)
    samples = (tmp_path / "a" / SAMPLES_FILE).read_text().splitlines()
    assert len(samples) == recorded["texts"] > 0
    assert all(site["settings"]["keep_fraction"] == 0.5 for site in fusion["sites"])
    assert CALIBRATED_RIDGE != FusionConfig().ridge  # the recipe's own refit weight, recorded
    assert all(site["settings"]["ridge"] == CALIBRATED_RIDGE for site in fusion["sites"])
    # fusing in memory gives the same samples and tensors (seeded sampling) ...
    in_memory, _ = compress(capsys, decoder_dir, "--ratio", "0.5", "--in-memory", "--out", tmp_path / "b")
    assert not in_memory["streamed"]
    assert (tmp_path / "b" / SAMPLES_FILE).read_text().splitlines() == samples
    assert json.loads((tmp_path / "b" / FUSION_FILE).read_text())["recipe"] == fusion["recipe"]
    # ... and so does fusing with the recorded samples as a calibration file
    compress(
        capsys, decoder_dir, "--ratio", "0.5", "--calibration", tmp_path / "a" / SAMPLES_FILE,
        "--keep-fraction", "0.5", "--out", tmp_path / "c",
    )  # fmt: skip
    first = tensors(tmp_path / "a")
    for other in ("b", "c"):
        again = tensors(tmp_path / other)
        assert all(torch.equal(first[name], again[name]) for name in first)
    paper = tensors(_paper(capsys, decoder_dir, tmp_path / "p"))
    assert any(not torch.equal(first[name], paper[name]) for name in first)


def _paper(capsys, base, out):
    result, _ = compress(capsys, base, "--ratio", "0.5", "--recipe", "paper", "--out", out)
    assert result["recipe"] == "paper"
    return out


@pytest.mark.parametrize("in_memory", [False, True])
def test_paper_recipe_is_exactly_data_free_fusion(capsys, tmp_path, decoder_dir, in_memory):
    out = tmp_path / "paper"
    extra = ["--in-memory"] if in_memory else []
    result, _ = compress(capsys, decoder_dir, "--ratio", "0.5", "--recipe", "paper", *extra, "--out", out)
    assert result["streamed"] is not in_memory
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(decoder_dir)
    fuse(model, FusionConfig(ratio=0.5))
    expected = {name: t for name, t in model.state_dict().items()}
    stored = tensors(out)
    assert set(stored) - set(expected) == set(placeholders(model))  # nothing else beside the model's tensors
    assert all(torch.equal(stored[name], expected[name]) for name in stored if name in expected)
    fusion = json.loads((out / FUSION_FILE).read_text())
    assert all(site["settings"]["keep_fraction"] == 0.0 for site in fusion["sites"])
    assert not (out / SAMPLES_FILE).exists()


def test_encoders_and_models_without_a_tokenizer_keep_the_paper_recipe(capsys, tmp_path):
    build("bert").save_pretrained(tmp_path / "bert")
    save_tokenizer(tmp_path / "bert")
    result, _ = compress(capsys, tmp_path / "bert", "--ratio", "0.5", "--out", tmp_path / "b")
    assert result["recipe"] == "paper" and result["streamed"]
    build("llama").save_pretrained(tmp_path / "bare")
    result, stderr = compress(capsys, tmp_path / "bare", "--ratio", "0.5", "--out", tmp_path / "l")
    assert result["recipe"] == "paper" and "no tokenizer" in stderr


def test_explicit_calibrated_recipe_without_a_tokenizer_exits_2_writing_nothing(capsys, tmp_path):
    build("llama").save_pretrained(tmp_path / "bare")
    code = main(["compress", str(tmp_path / "bare"), "--recipe", "calibrated", "--out", str(tmp_path / "o")])
    assert code == 2 and "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_library_verb_applies_the_recipe_and_returns_the_model(tmp_path, decoder_dir):
    from mlp_fusion import compress as library_compress

    done = library_compress(decoder_dir, tmp_path / "lib", ratio=0.5, layers="1", in_memory=True)
    assert done.recipe == "calibrated" and done.model is not None and not done.streamed
    assert all(r.settings["keep_fraction"] == 0.5 for r in fusion_records(done.model))
    streamed = library_compress(decoder_dir, tmp_path / "streamed", ratio=0.5, layers="1")
    assert streamed.streamed and streamed.model is None  # fused layer by layer: no whole model to return
    reloaded = from_pretrained(tmp_path / "streamed")
    assert all(r.settings["keep_fraction"] == 0.5 for r in fusion_records(reloaded))
    assert all(
        torch.equal(p, q) for p, q in zip(done.model.state_dict().values(), reloaded.state_dict().values())
    )
    # a field given wins over the recipe's, and None means the recipe's
    given = library_compress(
        decoder_dir, ratio=0.5, layers="1", in_memory=True, ridge=0.3, keep_fraction=None
    )
    assert [(r.settings["ridge"], r.settings["keep_fraction"]) for r in fusion_records(given.model)] == [
        (0.3, 0.5)
    ]


def test_finetune_on_a_causal_lm_calibrates_on_the_task_and_keeps_neurons_by_default(capsys, tmp_path):
    from test_generation import FAST, TASK, model_dir, run
    from tiny_models import write_data_to_text_task

    write_data_to_text_task(tmp_path / "d2t")
    base = model_dir(tmp_path, "llama")
    common = [*TASK, "--data", tmp_path / "d2t", "--ratio", "0.5", "--epochs", "1", *FAST]
    for recipe, keep, ridge in (("auto", 0.5, CALIBRATED_RIDGE), ("paper", 0.0, FusionConfig().ridge)):
        out = tmp_path / recipe
        code, _, stderr = run(capsys, "finetune", base, *common, "--recipe", recipe, "--out", out)
        assert code == 0, stderr
        run_record = json.loads((out / "run.json").read_text())
        fusion = json.loads((out / FUSION_FILE).read_text())
        assert run_record["keep_fraction"] == keep and run_record["calibrate"] is (keep > 0)
        assert run_record["recipe"] == ("calibrated" if keep else "paper")
        assert all(site["settings"]["keep_fraction"] == keep for site in fusion["sites"])
        assert all(site["settings"]["ridge"] == ridge for site in fusion["sites"])
        assert (fusion["recipe"]["calibration"] or {}).get("source") == ("task" if keep else None)


def test_info_prints_the_recipe_and_its_calibration(capsys, tmp_path, decoder_dir):
    compress(capsys, decoder_dir, "--ratio", "0.5", "--layers", "1", "--out", tmp_path / "a")
    assert main(["info", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    assert "recipe calibrated: calibration sampled" in shown and "keep_fraction=0.5" in shown
    assert "block_steps" not in shown  # fitting steps are shown only when used
    compress(
        capsys, decoder_dir, "--ratio", "0.5", "--layers", "1", "--block-steps", "3", "--out", tmp_path / "b"
    )
    assert main(["info", str(tmp_path / "b")]) == 0
    assert "block_steps=3" in capsys.readouterr().out

"""Layer-by-layer fusion of checkpoints on disk: the same tensors as fusing in memory, in the same dtype."""

import json

import pytest
import torch
import transformers
from tiny_models import FAMILIES, build, inputs, outputs

import mlp_fusion
from mlp_fusion.calibration import ModelRuns
from mlp_fusion.checkpoint_files import INDEX_FILE, WEIGHTS_FILE
from mlp_fusion.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compress(capsys, source, out, *extra) -> dict:
    code, stdout, stderr = run(capsys, "compress", source, "--out", out, "--json", *extra)
    assert code == 0, stderr
    return json.loads(stdout)


def same_tensors(left, right) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_from_shards_equals_fused_in_memory(capsys, tmp_path, family):
    build(family).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert (tmp_path / "base" / INDEX_FILE).is_file()  # the source is sharded
    options = ["--ratio", "0.5", "--layers", "1-2", "--shard-size", "0.00002"]  # about 20 KB per output file
    streamed = compress(capsys, tmp_path / "base", tmp_path / "streamed", *options)
    in_memory = compress(capsys, tmp_path / "base", tmp_path / "memory", *options, "--in-memory")
    assert streamed["streamed"] and not in_memory["streamed"]
    assert (tmp_path / "streamed" / INDEX_FILE).is_file()
    code, stdout, _ = run(capsys, "info", tmp_path / "streamed", "--json")
    assert code == 0 and json.loads(stdout)["parameters"] > streamed["params_after"]  # weights and scales
    assert [r["name"] for r in streamed["layers"]] == [r["name"] for r in in_memory["layers"]]
    assert (streamed["params_before"], streamed["params_after"]) == (
        in_memory["params_before"],
        in_memory["params_after"],
    )
    loaded = mlp_fusion.from_pretrained(tmp_path / "streamed")
    assert same_tensors(loaded, mlp_fusion.from_pretrained(tmp_path / "memory"))
    settings = [
        json.loads((tmp_path / d / "fusion.json").read_text())["sites"] for d in ("streamed", "memory")
    ]
    assert settings[0] == settings[1]
    batch = inputs()
    reference = build(family)
    mlp_fusion.fuse(reference, mlp_fusion.FusionConfig(ratio=0.5, layers="1-2"))
    assert torch.equal(outputs(loaded, batch), outputs(reference, batch))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_streaming_keeps_the_checkpoint_dtype_or_the_one_asked_for(capsys, tmp_path, family):
    build(family).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    compress(capsys, tmp_path / "base", tmp_path / "own", "--ratio", "0.5")
    compress(capsys, tmp_path / "base", tmp_path / "wide", "--ratio", "0.5", "--dtype", "float32")
    for name, dtype in (("own", torch.bfloat16), ("wide", torch.float32)):
        assert (tmp_path / name / WEIGHTS_FILE).is_file()  # small enough for one file
        loaded = mlp_fusion.from_pretrained(tmp_path / name)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert json.loads((tmp_path / name / "fusion.json").read_text())["dtype"] == str(dtype)[6:]
    in_memory = compress(capsys, tmp_path / "base", tmp_path / "memory", "--ratio", "0.5", "--in-memory")
    assert not in_memory["streamed"]
    assert same_tensors(
        mlp_fusion.from_pretrained(tmp_path / "own"), mlp_fusion.from_pretrained(tmp_path / "memory")
    )


def test_options_that_need_the_whole_model_fuse_in_memory_and_say_so(capsys, tmp_path):
    build("llama").save_pretrained(tmp_path / "base")
    code, stdout, stderr = run(
        capsys,
        "compress",
        tmp_path / "base",
        "--ratio",
        "0.5",
        "--verify",
        "--out",
        tmp_path / "out",
        "--json",
    )
    assert code == 0 and not json.loads(stdout)["streamed"]
    assert "fusing in memory: --verify" in stderr


def test_a_failure_in_a_later_layer_leaves_nothing_written(capsys, tmp_path):
    model = build("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "base")
    code, _, stderr = run(capsys, "compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "out")
    assert code == 2 and "NaN or infinite" in stderr and "layers.2" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("method", ["fusion", "svd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_equals_the_in_memory_export(capsys, tmp_path, family, method):
    model, batch = build(family), inputs()
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(method=method, ratio=0.5))
    expected = outputs(model, batch)
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    mlp_fusion.export(model, tmp_path / "memory")
    code, stdout, stderr = run(
        capsys, "export", tmp_path / "fused", "--out", tmp_path / "streamed", "--shard-size", "0.00002"
    )
    assert code == 0 and "exported" in stdout, stderr
    shards = list((tmp_path / "streamed").glob("*.safetensors"))
    assert len(shards) > 1 or family.startswith("gemma")  # shards of about 20 KB (gemma's tiny ones fit one)
    model_class = getattr(transformers, type(model).__name__)
    streamed, memory = (
        model_class.from_pretrained(tmp_path / name, experts_implementation="eager").eval()
        for name in ("streamed", "memory")
    )
    assert same_tensors(streamed, memory)
    assert float((outputs(streamed, batch) - expected).abs().max()) <= 1e-5
    note = json.loads((tmp_path / "streamed" / "mlp_fusion_export.json").read_text())
    assert [site["name"] for site in note["sites"]] == [r.name for r in model.mlp_fusion_record]


def test_streamed_export_refuses_mixed_widths_and_writes_nothing(capsys, tmp_path):
    model = build("llama")
    mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.5, layers="1"))
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    code, _, stderr = run(capsys, "export", tmp_path / "fused", "--out", tmp_path / "plain")
    assert code == 2 and "different widths" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plain").exists()


def calibration_inputs() -> dict:
    batch = inputs(seed=3, batch=11, length=9)  # two micro-batches, the second partial
    batch["attention_mask"][0, -3:] = 0  # and padding
    return batch


LAYERED = [family for family in FAMILIES if family != "switch"]


@pytest.mark.parametrize("family", LAYERED)
def test_calibrated_layer_by_layer_equals_calibrated_in_memory(tmp_path, family):
    from mlp_fusion.streaming import fuse_checkpoint

    build(family).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    config = mlp_fusion.FusionConfig(ratio=0.5, layers="1-2", keep_fraction=0.5)
    batch = calibration_inputs()
    report = fuse_checkpoint(tmp_path / "base", tmp_path / "streamed", config, calibration=batch)
    assert all(row.calibration_error is not None for row in report.layers)  # refitted on the layer runs
    in_memory = build(family)
    mlp_fusion.fuse(in_memory, config, calibration=batch)  # one layer at a time, in memory
    whole_runs = build(family)  # the whole model run up to each site, for every site
    mlp_fusion.fuse(whole_runs, config, calibration=ModelRuns(whole_runs, batch))
    loaded = mlp_fusion.from_pretrained(tmp_path / "streamed")
    assert same_tensors(loaded, in_memory) and same_tensors(loaded, whole_runs)
    data_free = build(family)
    mlp_fusion.fuse(data_free, config)
    assert not same_tensors(loaded, data_free)  # the calibration reached every fused layer's MLPs


def test_encoder_decoders_are_calibrated_in_memory_and_say_so(capsys, tmp_path):
    from tiny_models import save_tokenizer

    build("switch").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\nbad food in the north\n")
    options = ["--ratio", "0.5", "--calibration", texts]
    result = compress(capsys, tmp_path / "base", tmp_path / "out", *options)
    assert not result["streamed"]
    code, _, stderr = run(capsys, "compress", tmp_path / "base", "--out", tmp_path / "again", *options)
    assert code == 0 and "cannot be streamed (calibration layer by layer: an encoder-decoder" in stderr


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_compress_with_a_calibration_file_streams_and_matches_in_memory(capsys, tmp_path, family):
    from tiny_models import save_tokenizer

    build(family).to(torch.bfloat16).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    save_tokenizer(tmp_path / "base")
    texts = tmp_path / "texts.txt"
    texts.write_text("good film in the north\nbad food\nname : serves south\n" * 4)
    options = ["--ratio", "0.5", "--layers", "0,2", "--calibration", texts, "--calibration-samples", "10"]
    streamed = compress(capsys, tmp_path / "base", tmp_path / "streamed", *options)
    in_memory = compress(capsys, tmp_path / "base", tmp_path / "memory", *options, "--in-memory")
    assert streamed["streamed"] and not in_memory["streamed"]
    assert streamed["recipe"] == in_memory["recipe"] == "calibrated"
    loaded = mlp_fusion.from_pretrained(tmp_path / "streamed")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert same_tensors(loaded, mlp_fusion.from_pretrained(tmp_path / "memory"))
    described = [json.loads((tmp_path / d / "fusion.json").read_text()) for d in ("streamed", "memory")]
    assert described[0]["recipe"] == described[1]["recipe"]
    assert described[0]["recipe"]["calibration"]["texts"] == 10


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_a_budget_streams_in_two_passes_and_matches_in_memory(capsys, tmp_path, family, calibrated):
    from tiny_models import save_tokenizer

    build(family).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    save_tokenizer(tmp_path / "base")
    texts = tmp_path / "texts.txt"
    texts.write_text("good film in the north\nbad food\nname : serves south\n" * 4)
    data = ["--calibration", texts, "--calibration-samples", "10"] if calibrated else ["--recipe", "paper"]
    options = ["--budget", "0.5", "--layers", "0-2", *data]
    streamed = compress(capsys, tmp_path / "base", tmp_path / "streamed", *options)
    in_memory = compress(capsys, tmp_path / "base", tmp_path / "memory", *options, "--in-memory")
    assert streamed["streamed"] and not in_memory["streamed"]
    widths = [row["width_after"] for row in streamed["layers"]]
    assert widths == [row["width_after"] for row in in_memory["layers"]]
    assert len(set(widths)) > 1  # spread by sensitivity, not one ratio
    loaded = mlp_fusion.from_pretrained(tmp_path / "streamed")
    assert same_tensors(loaded, mlp_fusion.from_pretrained(tmp_path / "memory"))
    described = [json.loads((tmp_path / d / "fusion.json").read_text()) for d in ("streamed", "memory")]
    assert described[0]["sites"] == described[1]["sites"]


def test_reconstruction_layer_by_layer_equals_in_memory(tmp_path):
    from mlp_fusion.streaming import fuse_checkpoint

    build("llama").save_pretrained(tmp_path / "base")
    config = mlp_fusion.FusionConfig(ratio=0.5, layers="0,2", keep_fraction=0.5, reconstruct_steps=10)
    batch = calibration_inputs()
    fuse_checkpoint(tmp_path / "base", tmp_path / "streamed", config, calibration=batch)
    in_memory = build("llama")
    mlp_fusion.fuse(in_memory, config, calibration=batch)
    assert same_tensors(mlp_fusion.from_pretrained(tmp_path / "streamed"), in_memory)

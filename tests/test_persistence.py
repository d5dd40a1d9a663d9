import copy
import json

import pytest
import safetensors.torch
import torch
import transformers
from tiny_models import build, inputs, outputs

import mlp_fusion
from mlp_fusion import FusionConfig, UserError, fuse
from mlp_fusion.checkpoint_files import WEIGHTS_FILE
from mlp_fusion.persistence import FUSION_FILE


@pytest.fixture
def saved(tmp_path):
    model = build("bert")
    fuse(model, FusionConfig(ratio=0.5, layers="1-2"))
    path = mlp_fusion.save_pretrained(model, tmp_path / "fused")
    return model, path


def test_checkpoint_layout(saved):
    _, path = saved
    assert {p.name for p in path.iterdir()} >= {"config.json", WEIGHTS_FILE, FUSION_FILE}
    fusion = json.loads((path / FUSION_FILE).read_text())
    assert fusion["format_version"] == 1 and fusion["architecture"] == "BertModel"
    assert [(s["layer"], s["width_before"], s["width"], s["scaled"]) for s in fusion["sites"]] == [
        (1, 24, 12, True),
        (2, 24, 12, True),
    ]
    assert not list(path.parent.glob(".fused.tmp-*"))


def test_existing_directory_needs_overwrite(saved):
    model, path = saved
    before = (path / WEIGHTS_FILE).read_bytes()
    with pytest.raises(UserError, match="already exists"):
        mlp_fusion.save_pretrained(model, path)
    assert (path / WEIGHTS_FILE).read_bytes() == before
    mlp_fusion.save_pretrained(model, path, overwrite=True)


def test_failed_save_leaves_the_old_checkpoint(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mlp_fusion.persistence.save_file", broken)
    with pytest.raises(OSError):
        mlp_fusion.save_pretrained(model, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["fused"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / FUSION_FILE).unlink(), "fusion.json is missing"),
        (lambda p: (p / FUSION_FILE).write_text("{not json"), "damaged"),
        (lambda p: (p / FUSION_FILE).write_text('{"format_version": 1}'), "damaged"),
        (
            lambda p: (p / FUSION_FILE).write_text(
                (p / FUSION_FILE).read_text().replace('"width": 12', '"width": "x"')
            ),
            "damaged",
        ),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "missing"),
        (lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:500]), "damaged"),
    ],
)
def test_damaged_checkpoints_give_clear_errors(saved, damage, message):
    _, path = saved
    damage(path)
    with pytest.raises(UserError, match=message):
        mlp_fusion.from_pretrained(path)


def test_width_mismatch_in_fusion_json_is_caught(saved):
    _, path = saved
    fusion = json.loads((path / FUSION_FILE).read_text())
    fusion["sites"][0]["width"] = 7
    (path / FUSION_FILE).write_text(json.dumps(fusion))
    with pytest.raises(UserError, match="damaged|does not match"):
        mlp_fusion.from_pretrained(path)


def test_loaded_model_trains_only_stored_weights(saved):
    _, path = saved
    model = mlp_fusion.from_pretrained(path)
    model.train()
    scale_before = model.encoder.layer[1].output.dense.parametrizations.weight[0].scale.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(**inputs())[0].sum().backward()
    optimizer.step()
    assert torch.equal(model.encoder.layer[1].output.dense.parametrizations.weight[0].scale, scale_before)


def test_fusing_a_fused_layer_again_is_refused(saved):
    model, _ = saved
    with pytest.raises(UserError, match="already fused"):
        fuse(model, FusionConfig(ratio=0.5, layers=[2]))


def test_loading_in_another_dtype_keeps_scales_float32_and_tied_weights(tmp_path):
    from tiny_models import outputs

    model = build("gemma2")
    fuse(model, FusionConfig(ratio=0.5, layers="0-1"))
    path = mlp_fusion.save_pretrained(model, tmp_path / "fused")
    half = mlp_fusion.from_pretrained(path, dtype="bfloat16")
    stored = {name: t.dtype for name, t in half.state_dict().items()}
    assert {d for n, d in stored.items() if n.endswith(".scale")} == {torch.float32}
    assert {d for n, d in stored.items() if not n.endswith(".scale")} == {torch.bfloat16}
    assert half.lm_head.weight is half.model.embed_tokens.weight
    batch = inputs()
    expected = outputs(model, batch)
    assert (outputs(half, batch).float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(outputs(mlp_fusion.from_pretrained(path), batch), expected)  # own dtype by default


def test_loading_never_initialises_at_random(saved, monkeypatch):
    _, path = saved
    import torch.nn.init

    def refuse(tensor, *args, **kwargs):
        assert tensor.is_meta, "random initialisation of real storage while loading"
        return tensor

    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", refuse)
    mlp_fusion.from_pretrained(path)


def test_bad_dtype_is_refused(saved):
    _, path = saved
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        mlp_fusion.from_pretrained(path, dtype="float8")


def _drop_tensor(path, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_streamed_export_refuses_a_fused_checkpoint_missing_a_tensor(capsys, tmp_path):
    from mlp_fusion.cli import main

    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    _drop_tensor(tmp_path / "fused" / "model.safetensors", "model.norm.weight")
    code = main(["export", str(tmp_path / "fused"), "--out", str(tmp_path / "plain")])
    assert code == 2 and "model.norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("in_memory", [False, True])
def test_compress_refuses_a_checkpoint_missing_a_tensor(capsys, tmp_path, in_memory):
    from mlp_fusion.cli import main

    build("llama").save_pretrained(tmp_path / "base")
    _drop_tensor(tmp_path / "base" / "model.safetensors", "model.norm.weight")
    extra = ["--in-memory"] if in_memory else []
    code = main(["compress", str(tmp_path / "base"), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and "model.norm.weight" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_loaded_half_precision_model_computes_its_derived_buffers_as_transformers_does(tmp_path, family):
    """Rotary frequencies stay float32 and embedding scales take the model's dtype, as when transformers
    loads the checkpoint; the fused model's unfused layers then compute exactly what the original's do."""
    build(family).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    fused = copy.deepcopy(original)
    mlp_fusion.fuse(fused, mlp_fusion.FusionConfig(ratio=0.5, layers=[2]))
    mlp_fusion.save_pretrained(fused, tmp_path / "fused")
    loaded = mlp_fusion.from_pretrained(tmp_path / "fused")
    expected = dict(original.named_buffers())
    for name, buffer in loaded.named_buffers():
        if ".parametrizations." in name:
            continue  # fusion's own scales
        assert buffer.dtype == expected[name].dtype and torch.equal(buffer, expected[name]), name
    batch = inputs()
    assert torch.equal(outputs(loaded, batch), outputs(fused, batch))


@pytest.mark.parametrize("method", ["svd", "fusion", "prune"])
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_transformers_refuses_a_fused_checkpoint_instead_of_filling_weights_at_random(
    tmp_path, method, streamed
):
    """Low-rank factors keep every shape transformers checks: without the placeholders it built those MLPs
    at random and only warned. Every fused checkpoint must be refused by it, and load here to the same
    outputs."""
    model = build("llama")
    model.save_pretrained(tmp_path / "plain")
    out = tmp_path / "fused"
    mlp_fusion.compress(
        str(tmp_path / "plain"), out, method=method, ratio=0.5, in_memory=not streamed, recipe="paper"
    )
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    fused = copy.deepcopy(model)
    fuse(fused, FusionConfig(ratio=0.5, method=method))
    batch = inputs()
    loaded = mlp_fusion.from_pretrained(out)
    assert torch.allclose(outputs(loaded, batch), outputs(fused, batch), atol=1e-5)
    # the Trainer loads the best epoch's file with load_state_dict: the placeholders are passed over
    files = list(out.glob("*.safetensors"))
    stored = {key: value for path in files for key, value in safetensors.torch.load_file(path).items()}
    assert loaded.load_state_dict(stored, strict=False).unexpected_keys == []

import json

import pytest
import torch
from tiny_models import build, duplicate_neurons

from mlp_fusion import FusionConfig, fuse
from mlp_fusion.batches import probe_batch
from mlp_fusion.cli import main
from mlp_fusion.diagnostics import compare_methods, empirical_kernels, kernel_error, scalar_outputs
from mlp_fusion.diagnostics.parameters import kernel_modules, module_tensors


def probes(model, count=6):
    batch = probe_batch(model, None, count=count)
    batch["attention_mask"][1, -5:] = 0  # some padding, which must not count
    batch["attention_mask"][3, -9:] = 0
    return batch


def loop_kernels(model, batch, modules):
    """An independent computation: one example at a time, plain autograd, float64."""
    params = [p for m in modules for p in module_tensors(m)]
    rows = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        single = {k: v[i : i + 1, :length] for k, v in batch.items()}
        grads = torch.autograd.grad(scalar_outputs(model, single).sum(), params)
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    g = torch.stack(rows)
    return {"adam": g @ g.sign().T, "sgd": g @ g.T}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "mixtral"])
@pytest.mark.parametrize("method", [None, "fusion", "svd"])
def test_batched_kernels_match_an_independent_loop(family, method):
    model = build(family)
    if method:
        fuse(model, FusionConfig(method=method, ratio=0.5, layers=[1]))
    batch = probes(model)
    modules = kernel_modules(model, "mlp", "all")
    expected = loop_kernels(model, batch, modules)
    for naive in (False, True):
        measured = empirical_kernels(model, batch, modules, batch_size=4, naive=naive)
        for name in ("adam", "sgd"):
            error, alignment = kernel_error(expected[name], measured[name])
            assert error < 1e-5 and alignment == pytest.approx(1.0, abs=1e-9), (name, naive)


def test_chunked_and_unchunked_accumulation_agree():
    model = build("bert")
    batch = probes(model)
    modules = kernel_modules(model, "all", "all") + kernel_modules(model, "mlp", "all")
    whole = empirical_kernels(model, batch, modules, max_memory_mb=1e6)
    chunked = empirical_kernels(model, batch, modules, max_memory_mb=1e-4)
    for name in whole:
        assert kernel_error(whole[name], chunked[name])[0] < 1e-6


def test_full_width_preserves_everything():
    model = build("bert")
    batch = probes(model)
    result = compare_methods(
        model, batch, batch_size=4, methods=["fusion", "fold", "cluster", "prune"], ratios=[1.0], params="all"
    )
    for row in result["rows"]:
        assert row["output_error"] < 1e-5 and row["layer_output_error"] < 1e-5
        for name in ("adam", "sgd"):
            assert row[f"{name}_error"] < 1e-4 and row[f"{name}_alignment"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "mixtral", "qwen2_moe"])
def test_duplicated_neurons_fusion_keeps_the_adam_kernel_fold_does_not(family):
    model = build(family)
    duplicate_neurons(model)
    batch = probes(model)
    rows = {
        row["method"]: row
        for row in compare_methods(
            model, batch, batch_size=4, methods=["fusion", "fold"], ratios=[0.5], params="mlp"
        )["rows"]
    }
    assert rows["fusion"]["adam_error"] < 1e-5
    assert rows["fold"]["adam_error"] > 0.05
    assert rows["fold"]["output_error"] == pytest.approx(rows["fusion"]["output_error"], abs=1e-6)
    assert rows["fusion"]["output_error"] < 1e-5


def test_ntk_command_json_and_plot(capsys, model_dir, tmp_path):
    plot = tmp_path / "kernels.png"
    code = main(
        [
            "ntk",
            str(model_dir),
            "--methods",
            "fusion,prune",
            "--ratios",
            "0.5,0.25",
            "--probes",
            "5",
            "--json",
            "--plot",
            str(plot),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [(r["method"], r["ratio"]) for r in result["rows"]] == [
        ("fusion", 0.5),
        ("fusion", 0.25),
        ("prune", 0.5),
        ("prune", 0.25),
    ]
    keys = {"output_error", "adam_error", "adam_alignment", "sgd_error", "sgd_alignment", "params", "seconds"}
    assert all(keys <= set(r) for r in result["rows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ntk_verb_is_the_command(capsys, model_dir):
    import mlp_fusion

    options = ["--methods", "fusion,prune", "--ratios", "0.5", "--probes", "4", "--kernels", "adam"]
    assert main(["ntk", str(model_dir), *options, "--n-init", "2", "--json"]) == 0
    command = json.loads(capsys.readouterr().out)
    settings = mlp_fusion.NtkSettings(methods=["fusion", "prune"], ratios=[0.5], probes=4, kernels=("adam",))
    library = mlp_fusion.ntk(str(model_dir), settings, n_init=2)
    drop = ("seconds",)  # the rest must be equal
    assert [{k: v for k, v in r.items() if k not in drop} for r in library["rows"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in command["rows"]
    ]
    with pytest.raises(mlp_fusion.UserError, match="set by ntk itself"):
        mlp_fusion.ntk(str(model_dir), settings, ratio=0.5)
    with pytest.raises(mlp_fusion.UserError, match="NtkSettings, got dict"):
        mlp_fusion.ntk(str(model_dir), {"probes": 4})


def test_ntk_reads_a_tsv_probe_file(capsys, model_dir, tmp_path):
    probe_file = tmp_path / "probes.tsv"
    probe_file.write_text("sentence\tlabel\na fine film \t1\nnot good \t0\n")
    code = main(
        ["ntk", str(model_dir), "--methods", "fusion", "--ratios", "0.5", "--probe-file", str(probe_file)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "fusion" in out and "adam err" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kernels", "ntk"], "unknown kernel"),
        (["--params", "attention"], "unknown parameter set"),
        (["--probes", "0"], "--probes must be between"),
        (["--probe-file", "/no/such/file.txt"], "cannot read probe file"),
        (["--methods", "magic"], "unknown method"),
        (["--ratios", "2"], "ratio must be in (0, 1]"),
        (["--plot", "kernels.jpg"], "PNG"),
    ],
)
def test_ntk_bad_input(capsys, model_dir, args, message):
    code = main(["ntk", str(model_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe\x00bad"])
def test_ntk_empty_or_unreadable_probe_file(capsys, model_dir, tmp_path, content):
    path = tmp_path / "probes.txt"
    path.write_bytes(content)
    assert main(["ntk", str(model_dir), "--probe-file", str(path)]) == 2
    assert "probe file" in capsys.readouterr().err

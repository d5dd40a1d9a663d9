import json
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES, build

import mlp_fusion
from mlp_fusion.cli import main


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "nan-bert"
    model = build("bert")
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compress_json_report_and_saved_model(capsys, model_dir, tmp_path):
    out = tmp_path / "fused"
    code, stdout, _ = run(
        capsys, "compress", model_dir, "--ratio", "0.5", "--layers", "1-2", "--out", out, "--json", "--verify"
    )
    assert code == 0
    report = json.loads(stdout)  # stdout holds exactly one JSON object
    assert [(r["layer"], r["width_before"], r["width_after"]) for r in report["layers"]] == [
        (1, 24, 12),
        (2, 24, 12),
    ]
    assert all(set(r) >= {"layer", "expert", "inertia", "seconds"} for r in report["layers"])
    assert report["params_after"] < report["params_before"] and report["seconds"] > 0
    assert report["verify"]["reloaded_vs_fused"]["max_abs_diff"] == 0
    assert report["verify"]["fused_vs_original"]["relative_error"] > 0
    assert (out / "fusion.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_every_family_from_a_local_directory(capsys, family, tmp_path):
    build(family).save_pretrained(tmp_path / "model")
    out = tmp_path / "fused"
    code, stdout, stderr = run(
        capsys, "compress", tmp_path / "model", "--ratio", "0.5", "--out", out, "--json", "--verify"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["params_after"] < report["params_before"]
    assert report["verify"]["reloaded_vs_fused"]["max_abs_diff"] == 0


def test_compress_table(capsys, model_dir):
    code, stdout, stderr = run(capsys, "compress", model_dir, "--width", "6", "--method", "prune")
    assert code == 0
    assert "24 -> 6" in stdout and "parameters:" in stdout and "not saved" in stdout
    assert "[3/3]" in stderr  # progress, one line per site


def test_methods_lists_every_method(capsys):
    code, stdout, _ = run(capsys, "methods")
    assert code == 0
    assert {line.split()[0] for line in stdout.splitlines()} == {
        "fusion",
        "fold",
        "cluster",
        "prune",
        "sketch",
        "mmd",
        "svd",
    }


def test_export_command(capsys, model_dir, tmp_path):
    assert run(capsys, "compress", model_dir, "--ratio", "0.5", "--out", tmp_path / "fused")[0] == 0
    code, stdout, _ = run(capsys, "export", tmp_path / "fused", "--out", tmp_path / "plain")
    assert code == 0 and "exported" in stdout
    assert (tmp_path / "plain" / "config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "magic"], "unknown method"),
        (["--ratio", "0"], "ratio must be in (0, 1]"),
        (["--ratio", "1.5"], "ratio must be in (0, 1]"),
        (["--ratio", "nan"], "ratio must be in (0, 1]"),
        (["--width", "0"], "width must be at least 1"),
        (["--width", "1000"], "choose at most 24"),
        (["--layers", "9"], "out of range"),
        (["--layers", "two"], "bad layer spec"),
        (["--ratio", "0.5", "--width", "3"], "not allowed with argument"),
        (["--ratio", "half"], "invalid float value"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda:7"], "is not available"),
    ],
)
def test_bad_arguments(capsys, model_dir, tmp_path, args, message):
    out = tmp_path / "never"
    code, stdout, stderr = run(capsys, "compress", model_dir, *args, "--out", out)
    assert code == 2
    last = stderr.strip().splitlines()[-1]  # progress lines may come first; the error is one line
    assert message in last and last.startswith("error:") and stderr.count("error:") == 1
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()


def test_bfloat16_checkpoint_stays_bfloat16_unless_asked(capsys, tmp_path):
    base = tmp_path / "llama-bf16"
    build("llama").to(torch.bfloat16).save_pretrained(base)
    for args, expected in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        out = tmp_path / f"fused-{expected}"
        code, _, stderr = run(capsys, "compress", base, "--ratio", "0.5", "--out", out, *args)
        assert code == 0, stderr
        assert json.loads((out / "fusion.json").read_text())["dtype"] == expected
        loaded = mlp_fusion.from_pretrained(out)
        assert {p.dtype for p in loaded.parameters()} == {getattr(torch, expected)}


def test_offloaded_weights_are_refused_before_fusing():
    model = build("llama")
    model.model.layers[1].mlp.to("meta")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(mlp_fusion.UserError, match="not loaded"):
        mlp_fusion.fuse(model, mlp_fusion.FusionConfig(ratio=0.5))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_missing_model_path(capsys, tmp_path):
    code, _, stderr = run(capsys, "compress", tmp_path / "no-such-model")
    assert code == 2 and "does not exist" in stderr


def test_nan_weights(capsys, nan_model_dir, tmp_path):
    code, _, stderr = run(capsys, "compress", nan_model_dir, "--out", tmp_path / "out")
    assert code == 2 and "NaN or infinite" in stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(capsys, model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, stderr = run(capsys, "compress", model_dir, "--out", out)
    assert code == 2 and "--overwrite" in stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    code, _, stderr = run(capsys, "compress", model_dir, "--out", out, "--overwrite")
    assert code == 2 and "more than a model checkpoint" in stderr  # not a checkpoint: never replaced
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    assert run(capsys, "compress", model_dir, "--out", out)[0] == 2  # empty, but still only with --overwrite
    assert run(capsys, "compress", model_dir, "--out", out, "--overwrite")[0] == 0
    assert (out / "fusion.json").is_file()


def test_damaged_fused_directory(capsys, model_dir, tmp_path):
    assert run(capsys, "compress", model_dir, "--out", tmp_path / "fused")[0] == 0
    (tmp_path / "fused" / "fusion.json").write_text("garbage")
    for args in (
        ["export", tmp_path / "fused", "--out", tmp_path / "plain"],
        ["compress", tmp_path / "fused"],
    ):
        code, _, stderr = run(capsys, *args)
        assert code == 2 and "damaged" in stderr
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize(
    "family, number", [("bert", "embedding_cosine_mean"), ("llama", "next_token_agreement")]
)
def test_verify_reports_in_the_terms_of_the_models_job(capsys, tmp_path, family, number):
    """An encoder's sentence embeddings, a language model's next token: the same at full width (fusion is
    exact there), less so at half, and said in those words."""
    build(family).save_pretrained(tmp_path / "model")
    seen = {}
    for ratio in ("1.0", "0.5"):
        code, stdout, stderr = run(
            capsys, "compress", tmp_path / "model", "--ratio", ratio, "--verify", "--json"
        )
        assert code == 0, stderr
        seen[ratio] = json.loads(stdout)["verify"]["fused_vs_original"][number]
    assert seen["1.0"] == pytest.approx(1.0, abs=1e-6) and seen["0.5"] < seen["1.0"]
    code, stdout, _ = run(capsys, "compress", tmp_path / "model", "--ratio", "0.5", "--verify")
    words = "sentence-embedding cosine" if family == "bert" else "same next token at"
    assert code == 0 and words in stdout


@pytest.mark.slow
def test_console_script_on_the_bundled_model(tmp_path):
    script = shutil.which("mlp-fusion") or str(
        __import__("pathlib").Path(sys.executable).parent / "mlp-fusion"
    )
    out = tmp_path / "minilm-fused"
    args = [script, "compress", "--layers", "2-5", "--out", str(out), "--json", "--verify"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["layer"] for r in report["layers"]] == [2, 3, 4, 5]
    assert {(r["width_before"], r["width_after"]) for r in report["layers"]} == {(1536, 384)}
    assert report["verify"]["reloaded_vs_fused"]["max_abs_diff"] == 0
    assert 0 < report["verify"]["fused_vs_original"]["embedding_cosine_mean"] < 1  # real weights: not kept
    assert report["params_after"] < report["params_before"]


def test_info_shows_what_a_fused_checkpoint_holds(capsys, model_dir, tmp_path):
    out = tmp_path / "fused"
    assert run(capsys, "compress", model_dir, "--ratio", "0.5", "--layers", "1", "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "info", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    from safetensors.torch import load_file

    assert info["parameters"] == sum(t.numel() for t in load_file(out / "model.safetensors").values())
    (site,) = info["sites"]
    assert (site["layer"], site["width_before"], site["width"], site["method"]) == (1, 24, 12, "fusion")
    assert site["settings"]["ratio"] == 0.5 and site["settings"]["canonical"] is True
    import mlp_fusion

    assert mlp_fusion.info(out) == info  # the library verb is what the command prints
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "24 -> 12" in stdout and "canonical=True" in stdout
    code, _, stderr = run(capsys, "info", model_dir)
    assert code == 2 and "not a fused checkpoint" in stderr and "load it with transformers" in stderr
    (tmp_path / "data").mkdir()
    code, _, stderr = run(capsys, "info", tmp_path / "data")
    assert code == 2 and "holds no model" in stderr and "save the model again" not in stderr


def test_a_reader_that_stops_early_gets_no_traceback():
    code = "import sys; from mlp_fusion.cli import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # as `| head` does, before anything is printed
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == ""


def test_importing_the_core_leaves_training_and_diagnostics_out():
    code = (
        "import sys, mlp_fusion; "
        "print(sorted(m for m in sys.modules if m.startswith(('mlp_fusion.training', 'mlp_fusion.diagnostics'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert callable(__import__("mlp_fusion").distill)

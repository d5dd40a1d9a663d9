"""Fine-tuning and evaluation through the command line, on tiny models and a synthetic learnable task."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build, inputs, outputs, save_tokenizer, write_sentiment_task

from mlp_fusion import UserError, from_pretrained
from mlp_fusion.cli import main
from mlp_fusion.records import fusion_records

FAST = ["--lr", "1e-2", "--batch-size", "16", "--max-length", "32", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny BERT (no head) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    build("bert").save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentiment"
    write_sentiment_task(path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupt_at_first_save(monkeypatch) -> None:
    """Make the next run stop with Ctrl-C right after its first checkpoint is written."""
    from mlp_fusion.training import finetune as module

    def stop(self, args, state, control, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module._Progress, "on_save", stop, raising=False)


def sst2(capsys, model, data, out, *extra):
    """``finetune MODEL --task sst2`` with the fast settings: (exit code, stdout, stderr)."""
    return run(capsys, "finetune", model, "--task", "sst2", "--data", data, "--out", out, *FAST, *extra)


def finetune(capsys, model, data, out, *extra):
    code, stdout, stderr = run(
        capsys, "finetune", model, "--task", "sst2", "--data", data, "--out", out, "--json", *FAST, *extra
    )
    assert code == 0, stderr
    return json.loads(stdout)


def test_fused_model_learns_the_task_and_saves_what_evaluate_scores(capsys, base_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    result = finetune(
        capsys, base_dir, task_dir, out, "--method", "fusion", "--ratio", "0.5", "--epochs", "3"
    )
    assert set(result) >= {
        "task", "method", "ratio", "metrics", "train_seconds", "train_steps_per_second", "peak_memory_mb",
        "params", "trainable_params",
    }  # fmt: skip
    assert (result["task"], result["method"], result["ratio"]) == ("sst2", "fusion", 0.5)
    assert result["metrics"]["accuracy"] > 0.85  # chance is about 0.5
    assert result["train_steps"] == 3 * 16  # 256 examples in batches of 16, three epochs
    assert result["params"] < result["params_before_fusion"]
    assert result["trainable_params"] == result["params"]  # every stored tensor trains; scales are buffers
    assert json.loads((out / "metrics.json").read_text())["metrics"] == result["metrics"]
    assert not (out / "checkpoints").exists()
    code, stdout, _ = run(capsys, "evaluate", out, "--task", "sst2", "--data", task_dir, "--json")
    assert code == 0
    assert json.loads(stdout)["metrics"] == pytest.approx(result["metrics"])


def test_scales_stay_fixed_and_records_follow_the_head(capsys, base_dir, task_dir, tmp_path):
    fused = tmp_path / "fused"
    assert run(capsys, "compress", base_dir, "--ratio", "0.5", "--layers", "1-2", "--out", fused)[0] == 0
    before = from_pretrained(fused).state_dict()
    out = tmp_path / "run"
    result = finetune(capsys, fused, task_dir, out, "--epochs", "1")
    assert result["method"] == "fusion"
    tuned = from_pretrained(out)
    assert type(tuned).__name__ == "BertForSequenceClassification"
    assert [r.name for r in fusion_records(tuned)] == ["bert.encoder.layer.1", "bert.encoder.layer.2"]
    after = tuned.state_dict()
    scales = [k for k in before if k.endswith(".scale")]
    assert len(scales) == 2
    for key in scales:
        assert torch.equal(before[key], after[f"bert.{key}"])
    weight = "encoder.layer.1.intermediate.dense.weight"
    assert not torch.equal(before[weight], after[f"bert.{weight}"])  # the fused MLP itself did train


def test_full_baseline_keeps_every_parameter(capsys, base_dir, task_dir, tmp_path):
    result = finetune(capsys, base_dir, task_dir, tmp_path / "run", "--method", "full", "--epochs", "1")
    assert result["method"] == "full" and result["ratio"] is None
    assert result["params"] == result["params_before_fusion"]
    assert json.loads((tmp_path / "run" / "fusion.json").read_text())["sites"] == []


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_precision_sets_the_dtype_of_training_products_only(
    capsys, base_dir, task_dir, tmp_path, monkeypatch, precision
):
    seen = {True: set(), False: set()}  # output dtypes of linear layers, while training and not
    linear = torch.nn.Linear.forward

    def recording(self, x):
        out = linear(self, x)
        seen[self.training].add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    result = finetune(capsys, base_dir, task_dir, tmp_path / "run", "--epochs", "3", "--precision", precision)
    assert result["precision"] == precision
    assert seen[True] == {getattr(torch, precision)}
    assert result["metrics"]["accuracy"] > 0.85  # chance is about 0.5
    tuned = from_pretrained(tmp_path / "run")
    assert {p.dtype for p in tuned.parameters()} == {torch.float32}  # the weights stay float32


def test_distillation_before_fine_tuning_lowers_the_hidden_state_error(capsys, base_dir, task_dir, tmp_path):
    result = finetune(
        capsys,
        base_dir,
        task_dir,
        tmp_path / "run",
        "--ratio",
        "0.25",
        "--distill-epochs",
        "2",
        "--epochs",
        "1",
    )
    distilled = result["distill"]
    assert distilled["epochs"] == 2
    assert distilled["hidden_state_error_after"] < 0.8 * distilled["hidden_state_error_before"]


def test_calibrated_fusion_on_the_training_inputs(capsys, base_dir, task_dir, tmp_path):
    result = finetune(
        capsys, base_dir, task_dir, tmp_path / "run", "--ratio", "0.5", "--calibrate",
        "--calibration-samples", "32", "--epochs", "2",
    )  # fmt: skip
    assert result["metrics"]["accuracy"] > 0.85
    fusion = json.loads((tmp_path / "run" / "fusion.json").read_text())
    assert all(site["settings"]["refit"] and site["settings"]["weighting"] for site in fusion["sites"])


def test_the_library_verb_is_what_the_command_runs(capsys, base_dir, task_dir, tmp_path):
    import mlp_fusion
    from mlp_fusion.training.finetune import TrainSettings
    from mlp_fusion.training.tasks import TaskOptions

    settings = dict(lr=1e-2, batch_size=16, warmup_ratio=0.0, epochs=1, seed=2)
    result = mlp_fusion.finetune(
        base_dir, "sst2", tmp_path / "library", options=TaskOptions(data=task_dir, max_length=32),
        train=TrainSettings(**settings), ratio=0.5, layers="1-2",
    )  # fmt: skip
    command = finetune(capsys, base_dir, task_dir, tmp_path / "cli", "--ratio", "0.5", "--layers", "1-2",
                       "--epochs", "1", "--seed", "2")  # fmt: skip
    assert result["metrics"] == pytest.approx(command["metrics"]) and result["params"] == command["params"]
    recorded = [json.loads((tmp_path / run / "run.json").read_text()) for run in ("library", "cli")]
    assert recorded[0] == recorded[1]  # so either can resume the other's run
    with pytest.raises(UserError, match="unknown fusion setting 'ratios'"):
        mlp_fusion.finetune(base_dir, "sst2", tmp_path / "x", options=TaskOptions(data=task_dir), ratios=0.5)
    with pytest.raises(UserError, match="already fused; leave out --n-init, which"):
        mlp_fusion.finetune(
            tmp_path / "cli", "sst2", tmp_path / "x", options=TaskOptions(data=task_dir), n_init=3
        )
    assert not (tmp_path / "x").exists()


def test_resume_continues_from_the_checkpoint(capsys, base_dir, task_dir, tmp_path, monkeypatch):
    common = ("--ratio", "0.5", "--epochs", "2", "--seed", "3")
    reference = finetune(capsys, base_dir, task_dir, tmp_path / "reference", *common)
    out = tmp_path / "run"
    interrupt_at_first_save(monkeypatch)
    code, _, stderr = sst2(capsys, base_dir, task_dir, out, *common)
    assert code == 130 and "--resume" in stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-16"]
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    code, _, stderr = sst2(capsys, base_dir, task_dir, out, *common)
    assert code == 2 and "--resume" in stderr  # an unfinished run is not silently replaced
    resumed = finetune(capsys, base_dir, task_dir, out, *common, "--resume")
    assert resumed["train_steps"] == reference["train_steps"] == 32
    assert resumed["metrics"] == pytest.approx(reference["metrics"])
    final, expected = from_pretrained(out).state_dict(), from_pretrained(tmp_path / "reference").state_dict()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-4, atol=1e-5)
    code, _, stderr = sst2(capsys, base_dir, task_dir, out, *common, "--resume")
    assert code == 2 and "complete" in stderr


def test_resume_refuses_changed_settings(capsys, base_dir, task_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_first_save(monkeypatch)
    sst2(capsys, base_dir, task_dir, out, "--epochs", "2")
    monkeypatch.undo()
    code, _, stderr = sst2(capsys, base_dir, task_dir, out, "--epochs", "3", "--resume")
    assert code == 2 and "epochs 2 -> 3" in stderr


def test_resume_refuses_a_model_written_again_since_the_run_began(
    capsys, base_dir, task_dir, tmp_path, monkeypatch
):
    model = tmp_path / "model"
    shutil.copytree(base_dir, model)
    out = tmp_path / "run"
    interrupt_at_first_save(monkeypatch)
    assert sst2(capsys, model, task_dir, out, "--epochs", "2")[0] == 130
    monkeypatch.undo()
    build("bert", seed=1).save_pretrained(model)  # another model of the same shapes, at the same path
    code, _, stderr = sst2(capsys, model, task_dir, out, "--epochs", "2", "--resume")
    assert code == 2 and "was written again since the run" in stderr


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_decoders_fine_tune_fused_and_reload(capsys, task_dir, tmp_path, family):
    path = tmp_path / family
    build(family).save_pretrained(path)
    save_tokenizer(path)
    out = tmp_path / "run"
    result = finetune(
        capsys, path, task_dir, out, "--ratio", "0.5", "--epochs", "1", "--max-train-samples", "64"
    )
    assert result["train_steps"] == 4 and result["params"] < result["params_before_fusion"]
    code, stdout, _ = run(capsys, "evaluate", out, "--task", "sst2", "--data", task_dir, "--json")
    assert code == 0 and json.loads(stdout)["metrics"] == pytest.approx(result["metrics"])


def test_lora_on_a_fused_model_trains_adapters_and_saves_them_merged(capsys, base_dir, task_dir, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs the peft extra (make setup installs it)")
    out = tmp_path / "run"
    result = finetune(
        capsys, base_dir, task_dir, out, "--ratio", "0.5", "--peft", "lora", "--lora-rank", "4",
        "--epochs", "5",
    )  # fmt: skip
    assert result["metrics"]["accuracy"] > 0.85
    assert result["trainable_params"] < result["params"] / 2  # adapters and the new head only
    tuned = from_pretrained(out)
    assert not any("lora" in key for key in tuned.state_dict())
    assert [r.name for r in fusion_records(tuned)] == [f"bert.encoder.layer.{i}" for i in range(3)]
    code, stdout, _ = run(capsys, "evaluate", out, "--task", "sst2", "--data", task_dir, "--json")
    assert code == 0 and json.loads(stdout)["metrics"] == pytest.approx(result["metrics"])


def test_csv_task_with_named_labels_from_jsonl(capsys, base_dir, tmp_path):
    from tiny_models import sentiment_rows

    data = tmp_path / "data"
    data.mkdir()
    for name, count, seed in (("train", 256, 5), ("dev", 32, 6)):
        rows = [
            {"review": text, "mood": ("sour", "sweet")[label]} for text, label in sentiment_rows(count, seed)
        ]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--task", "csv", "--text-column", "review", "--label-column", "mood", "--data", data]
    code, stdout, stderr = run(
        capsys, "finetune", base_dir, *args, "--out", tmp_path / "run", "--json", *FAST, "--epochs", "3"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["metrics"]["accuracy"] > 0.7
    assert from_pretrained(tmp_path / "run").config.id2label == {0: "sour", 1: "sweet"}
    code, stdout, _ = run(capsys, "evaluate", tmp_path / "run", *args, "--json")
    assert code == 0 and json.loads(stdout)["metrics"] == pytest.approx(result["metrics"])


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_DATA = {
    "missing dev file": ({"train.tsv": "sentence\tlabel\ngood\t1\n"}, [], "has no dev.tsv"),
    "missing column": ({"train.tsv": "text\tlabel\ngood\t1\n", "dev.tsv": "sentence\tlabel\nbad\t0\n"}, [], "no column 'sentence'"),
    "empty split": ({"train.tsv": "sentence\tlabel\ngood\t1\n", "dev.tsv": ""}, [], "has no examples"),
    "label out of range": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t7\n", "dev.tsv": "sentence\tlabel\nbad\t0\n"}, [], "line 3: label '7' is out of range"),
    "not UTF-8": ({"train.tsv": b"sentence\tlabel\ngo\xff\xfeod\t1\n", "dev.tsv": "sentence\tlabel\nbad\t0\n"}, [], "not UTF-8"),
    "csv label unseen in train": (
        {"train.csv": "t,l\ngood,pos\nbad,neg\n", "dev.csv": "t,l\nfine,meh\n"},
        ["--task", "csv", "--text-column", "t", "--label-column", "l"],
        "label 'meh' is out of range",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_naming_the_file_and_writes_nothing(capsys, base_dir, tmp_path, case):
    files, extra, message = BAD_DATA[case]
    for name, content in files.items():
        _write(tmp_path / "data" / name, content)
    task = [] if extra else ["--task", "sst2"]
    out = tmp_path / "run"
    code, _, stderr = run(
        capsys, "finetune", base_dir, *task, *extra, "--data", tmp_path / "data", "--out", out
    )
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert message in stderr and str(tmp_path / "data") in stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "glue"], "unknown task 'glue'"),
        (["--task", "csv"], "needs --text-column and --label-column"),
        (["--task", "sst2", "--method", "magic"], "unknown method 'magic'"),
        (["--task", "sst2", "--method", "full", "--ratio", "0.5"], "--method full"),
        (["--task", "sst2", "--epochs", "0"], "epochs must be at least 1"),
        (["--task", "sst2", "--lr", "-1"], "learning rate must be positive"),
        (["--task", "sst2", "--resume"], "nothing to resume"),
        (["--task", "sst2", "--distill-epochs", "-1"], "--distill-epochs"),
        (["--task", "sst2", "--text-column", "x"], "are for --task csv"),
        (["--task", "sst2", "--calibrate", "--calibration-samples", "0"], "--calibration-samples"),
        (["--task", "sst2", "--method", "full", "--calibrate"], "--method full"),
        (["--task", "sst2", "--method", "full", "--keep-fraction", "0.5"], "--method full"),
        (["--task", "sst2", "--keep-fraction", "1"], "keep_fraction must be in [0, 1)"),
        (["--task", "sst2", "--ridge", "-1"], "ridge"),
        (["--task", "sst2", "--lora-rank", "4"], "add --peft lora"),
        (["--task", "sst2", "--peft", "lora", "--lora-rank", "0"], "--lora-rank"),
        (["--task", "sst2", "--scheduler", "cosine"], "unknown scheduler 'cosine'"),
        (["--task", "sst2", "--warmup-ratio", "1"], "warm-up ratio"),
        (["--task", "sst2", "--precision", "float16"], "invalid choice: 'float16'"),
    ],
)
def test_bad_options_exit_2_before_writing(capsys, base_dir, task_dir, tmp_path, args, message):
    out = tmp_path / "run"
    code, _, stderr = run(capsys, "finetune", base_dir, "--data", task_dir, "--out", out, *args)
    assert code == 2 and message in stderr
    assert not out.exists()


def test_evaluate_refuses_a_model_without_a_trained_head(capsys, base_dir, task_dir):
    code, _, stderr = run(capsys, "evaluate", base_dir, "--task", "sst2", "--data", task_dir)
    assert code == 2 and "no trained classification head" in stderr


def test_two_processes_train_with_distributed_data_parallel(base_dir, task_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each sees half the batches; one model and one metrics file."""
    out = tmp_path / "ddp"
    script = Path(sys.executable).parent / "mlp-fusion"  # the installed command, as the README runs it
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(script), "finetune", str(base_dir), "--task", "sst2", "--data", str(task_dir), "--out", str(out),
        "--ratio", "0.5", "--epochs", "3", "--json", *FAST,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # only the main process reports
    assert results[0]["train_steps"] == 3 * 8  # 256 examples / (2 processes x 16) per epoch
    assert results[0]["metrics"]["accuracy"] > 0.7
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 24
    assert from_pretrained(out) is not None


def finetune_processes(processes: int, out, arguments: list, port: int, log: list | None = None) -> dict:
    """``mlp-fusion finetune ARGUMENTS`` under torchrun (one process: plain), its one JSON result (its
    stderr appended to ``log``)."""
    script = Path(sys.executable).parent / "mlp-fusion"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launch += ["--master_port", str(port)] if processes > 1 else []
    command = [
        *(launch if processes > 1 else [sys.executable]),
        str(script),
        "finetune",
        *map(str, arguments),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*command, "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if log is not None:
        log.append(done.stderr)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # only the main process reports
    return results[0]


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_two_sharded_processes_train_as_one_process_does(model, task_dir, tmp_path):
    """FSDP2 over 2 CPU processes (gloo), 8 examples each per step, against one process with 16: the same
    loss step by step, and one gathered fused checkpoint that reloads with the same outputs. Dropout is off
    (the processes draw their own masks)."""
    source = tmp_path / f"tiny-{model}"
    base = build(model)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(base.config, name):
            setattr(base.config, name, 0.0)
    base.save_pretrained(source)
    save_tokenizer(source)
    common = [
        source,
        "--task",
        "sst2",
        "--data",
        task_dir,
        "--ratio",
        "0.5",
        "--epochs",
        "1",
        "--recipe",
        "paper",
    ]
    common += ["--lr", "1e-2", "--max-length", "32", "--warmup-ratio", "0"]
    one = finetune_processes(1, tmp_path / "one", [*common, "--batch-size", "16"], 0)
    two = finetune_processes(2, tmp_path / "two", [*common, "--batch-size", "8", "--fsdp"], 29523)
    assert len(one["losses"]) == len(two["losses"]) == 16  # 256 examples / 16 per step
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-3
    assert len(two["peak_memory_mb_per_process"]) == 2
    assert two["params"] == one["params"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["fsdp"] is True
    batch = inputs(seed=4, batch=3, length=6)
    sharded, single = from_pretrained(tmp_path / "two"), from_pretrained(tmp_path / "one")
    assert [r.name for r in fusion_records(sharded)] == [r.name for r in fusion_records(single)]
    torch.testing.assert_close(outputs(sharded, batch), outputs(single, batch), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("size, port", [(["--ratio", "0.5"], 29524), (["--width", "11"], 29525)])
def test_a_fused_checkpoint_is_read_already_sharded_and_trains_as_one_process_does(tmp_path, size, port):
    """finetune FUSED_DIR --fsdp: no process loads the whole model, each reads its own rows of every
    tensor; the losses, and the gathered checkpoint's outputs, are those of one process reading it whole.
    An odd fused width (11 rows over 2 processes: 6 and 5) checks sizes that do not divide evenly."""
    from tiny_models import write_data_to_text_task

    task = tmp_path / "d2t"
    write_data_to_text_task(task)
    source = tmp_path / "tiny-llama"
    build("llama").save_pretrained(source)
    save_tokenizer(source)
    assert main(["compress", str(source), *size, "--recipe", "paper", "--out", str(tmp_path / "f")]) == 0
    common = [tmp_path / "f", "--task", "text2text", "--source-column", "mr", "--target-column", "text"]
    common += ["--data", task, "--epochs", "1", "--lr", "1e-2", "--max-length", "32", "--warmup-ratio", "0"]
    common += ["--max-new-tokens", "4", "--max-eval-samples", "4"]
    log = []
    one = finetune_processes(1, tmp_path / "one", [*common, "--batch-size", "16"], 0)
    two = finetune_processes(2, tmp_path / "two", [*common, "--batch-size", "8", "--fsdp"], port, log)
    assert "each process read only its own rows" in log[0]
    assert len(one["losses"]) == len(two["losses"]) == 6  # 96 pairs / 16 per step
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-3
    batch = inputs(seed=4, batch=3, length=6)
    sharded, single = from_pretrained(tmp_path / "two"), from_pretrained(tmp_path / "one")
    assert sum(p.numel() for p in sharded.parameters()) == sum(p.numel() for p in single.parameters())
    torch.testing.assert_close(outputs(sharded, batch), outputs(single, batch), atol=1e-4, rtol=1e-3)


def test_fsdp_needs_torchrun_and_refuses_what_it_does_not_combine_with(capsys, base_dir, task_dir, tmp_path):
    base = [base_dir, "--task", "sst2", "--data", task_dir, "--fsdp", "--out", tmp_path / "out"]
    code, _, stderr = run(capsys, "finetune", *base)
    assert code == 2 and "torchrun --nproc_per_node N" in stderr
    os.environ["WORLD_SIZE"] = "2"  # as torchrun sets it: refused before any process group is joined
    try:
        for extra, message in ((["--resume"], "--resume"), (["--peft", "lora"], "--peft")):
            code, _, stderr = run(capsys, "finetune", *base, *extra)
            assert code == 2 and f"does not combine with {message}" in stderr
    finally:
        del os.environ["WORLD_SIZE"]
    assert not (tmp_path / "out").exists()


def test_training_options_default_to_the_settings_dataclass():
    from dataclasses import asdict

    from mlp_fusion.cli import build_parser
    from mlp_fusion.cli.common import config_values
    from mlp_fusion.training.finetune import TrainSettings

    args = build_parser().parse_args(["finetune", "--task", "sst2"])
    assert TrainSettings(**config_values(args, TrainSettings)) == TrainSettings()
    assert set(config_values(args, TrainSettings)) == set(asdict(TrainSettings())) - {
        "adam_beta2",
        "adam_epsilon",
    }


def test_gathering_a_sharded_model_keeps_tied_weights_tied(tmp_path):
    """One gloo process: shard, gather, and the head is the embedding again (not a second copy)."""
    import torch.distributed as dist
    import transformers

    from mlp_fusion import FusionConfig, fuse
    from mlp_fusion.training import sharding

    config = build("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    fuse(model, FusionConfig(ratio=0.5))
    expected = outputs(model, inputs())
    params = sum(p.numel() for p in model.parameters())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain = sharding.skeleton(model)
        sharding.shard(model)
        gathered = sharding.gather(model, plain)
    finally:
        dist.destroy_process_group()
    assert gathered.lm_head.weight is gathered.model.embed_tokens.weight
    assert sum(p.numel() for p in gathered.parameters()) == params
    torch.testing.assert_close(outputs(gathered, inputs()), expected)

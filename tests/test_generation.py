"""Fine-tuning fused decoders on data-to-text, generation after save/load and export, and the CLI's errors."""

import json

import pytest
import torch
from tiny_models import build, inputs, save_tokenizer, write_data_to_text_task

from mlp_fusion import FusionConfig, evaluate, export, from_pretrained, fuse, save_pretrained
from mlp_fusion.cli import main
from mlp_fusion.training.data2text import read_text2text
from mlp_fusion.training.generation import PadCollator, PairDataset, generate
from mlp_fusion.training.tasks import TaskOptions

TASK = ["--task", "text2text", "--source-column", "mr", "--target-column", "text"]
FAST = [
    "--lr",
    "5e-3",
    "--batch-size",
    "8",
    "--max-length",
    "32",
    "--warmup-ratio",
    "0",
    "--max-new-tokens",
    "6",
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d2t"
    write_data_to_text_task(path)
    return path


def model_dir(tmp_path, family: str):
    path = tmp_path / family
    build(family).save_pretrained(path)
    save_tokenizer(path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_loss(model, tokenizer, task_dir) -> float:
    items = read_text2text(task_dir / "dev.jsonl", "mr", "text")
    dataset = PairDataset([(i.source, i.references[0]) for i in items], tokenizer, 32)
    batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mixtral"])
def test_fused_decoder_fine_tunes_and_generates_the_same_after_loading(capsys, tmp_path, task_dir, family):
    import transformers

    base = model_dir(tmp_path, family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    before = eval_loss(transformers.AutoModelForCausalLM.from_pretrained(base), tokenizer, task_dir)
    out = tmp_path / "run"
    code, stdout, stderr = run(
        capsys,
        "finetune",
        base,
        *TASK,
        "--data",
        task_dir,
        "--ratio",
        "0.5",
        "--epochs",
        "2",
        "--out",
        out,
        "--json",
        *FAST,
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result["metrics"]) == {"bleu", "chrf", "ter", "rouge_l"}
    assert result["epochs"][-1]["loss"] < 0.7 * before  # the evaluation loss fell
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(read_text2text(task_dir / "dev.jsonl", "mr", "text"))  # grouped by input
    assert all(set(r) >= {"input", "output", "references"} for r in records)
    reloaded = from_pretrained(out)
    again = generate(reloaded, tokenizer, [r["input"] for r in records], max_new_tokens=6, max_length=32)
    assert again == [r["output"] for r in records]
    code, stdout, _ = run(
        capsys,
        "evaluate",
        out,
        *TASK,
        "--data",
        task_dir,
        "--json",
        "--max-new-tokens",
        "6",
        "--max-length",
        "32",
        "--predictions",
        tmp_path / "new" / "outputs.jsonl",  # its folder is made
    )
    assert code == 0 and json.loads(stdout)["metrics"] == pytest.approx(result["metrics"])
    kept = [json.loads(line) for line in (tmp_path / "new" / "outputs.jsonl").read_text().splitlines()]
    assert [r["output"] for r in kept] == [r["output"] for r in records]
    options = TaskOptions(
        data=task_dir, source_column="mr", target_column="text", max_new_tokens=6, max_length=32
    )
    library = evaluate(out, "text2text", options=options, predictions=tmp_path / "library.jsonl")
    assert library["metrics"] == pytest.approx(result["metrics"])  # the library verb is the command's
    assert (tmp_path / "library.jsonl").read_text() == (tmp_path / "new" / "outputs.jsonl").read_text()


@pytest.mark.parametrize(
    ("task", "where", "message"),
    [
        (TASK, "notes/outputs.jsonl", "cannot be written; choose another path"),
        (TASK, "notes", "notes already exists; choose another --predictions file"),
        (["--task", "sst2"], "outputs.jsonl", "and sst2 generates none; leave it out"),
    ],
    ids=["under-a-file", "existing", "classification"],
)
def test_evaluate_refuses_a_predictions_file_before_scoring(capsys, tmp_path, task_dir, task, where, message):
    (tmp_path / "notes").write_text("mine")
    args = [
        "evaluate",
        model_dir(tmp_path, "llama"),
        *task,
        "--data",
        task_dir,
        "--predictions",
        tmp_path / where,
    ]
    code, _, err = run(capsys, *args)
    assert code == 2 and err.strip().splitlines()[-1].endswith(message) and "Traceback" not in err
    assert (tmp_path / "notes").read_text() == "mine" and not (tmp_path / "outputs.jsonl").exists()


def test_lora_on_a_fused_decoder_generates_the_same_after_merging_and_loading(capsys, tmp_path, task_dir):
    pytest.importorskip("peft", reason="LoRA needs the peft extra (make setup installs it)")
    import transformers

    base = model_dir(tmp_path, "llama")
    out = tmp_path / "run"
    code, stdout, stderr = run(
        capsys, "finetune", base, *TASK, "--data", task_dir, "--ratio", "0.5", "--peft", "lora",
        "--epochs", "1", "--out", out, "--json", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["trainable_params"] < result["params"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    reloaded = from_pretrained(out)
    again = generate(reloaded, tokenizer, [r["input"] for r in records], max_new_tokens=6, max_length=32)
    assert again == [r["output"] for r in records]  # predictions came from the unmerged adapters


def test_generation_on_fused_saved_and_exported_models_agrees(tmp_path):
    import transformers

    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    prompt = inputs()["input_ids"][:1]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    save_pretrained(model, tmp_path / "fused")
    export(model, tmp_path / "plain")
    for loaded in (
        from_pretrained(tmp_path / "fused"),
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain"),
    ):
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_webnlg_scores_split_into_seen_and_unseen_categories(capsys, tmp_path):
    data = tmp_path / "webnlg"
    data.mkdir()
    rows = []
    for index, (category, who) in enumerate(
        [("Airport", "ana"), ("Food", "bo"), ("Artist", "cy"), ("Politician", "di")] * 4
    ):
        rows.append({
            "eid": f"Id{index}", "category": category, "modifiedtripleset": [f"{who} | food | rice"],
            "lex": [{"text": f"{who} serves rice food"}, {"text": f"{who} food"}],
        })  # fmt: skip
    for name in ("train", "dev"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = model_dir(tmp_path, "llama")
    code, stdout, stderr = run(
        capsys,
        "finetune",
        base,
        "--task",
        "webnlg",
        "--data",
        data,
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        "--json",
        *FAST,
    )
    assert code == 0, stderr
    metrics = json.loads(stdout)["metrics"]
    assert {"bleu", "seen_bleu", "unseen_bleu", "seen_rouge_l", "unseen_ter"} <= set(metrics)
    assert json.loads(stdout)["train_examples"] == 32  # 16 inputs x 2 references


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "text2text", "--source-column", "mr"], "needs --source-column and --target-column"),
        (["--task", "webnlg", "--source-column", "mr"], "are for --task text2text"),
        (
            ["--task", "text2text", "--source-column", "mr", "--target-column", "missing"],
            "lacks 'mr' or 'missing'",
        ),
        ([*TASK, "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_generation_options_exit_2_before_writing(capsys, tmp_path, task_dir, args, message):
    base = model_dir(tmp_path, "llama")
    code, _, stderr = run(capsys, "finetune", base, *args, "--data", task_dir, "--out", tmp_path / "run")
    assert code == 2 and message in stderr
    assert not (tmp_path / "run").exists()


def test_data_to_text_refuses_an_encoder(capsys, tmp_path, task_dir):
    base = model_dir(tmp_path, "bert")
    code, _, stderr = run(capsys, "finetune", base, *TASK, "--data", task_dir, "--out", tmp_path / "run")
    assert code == 2 and "decoder-only language model" in stderr


def test_a_registered_task_runs_through_the_cli_and_the_python_job(capsys, tmp_path, task_dir):
    """Adding a task is one registry entry: finetune runs it, and load_job gives Python users the same job."""
    from mlp_fusion.errors import UserError
    from mlp_fusion.training.jobs import load_job
    from mlp_fusion.training.tasks import GENERATION, GenerationTask, TaskOptions, register_task

    def reversed_texts(path, options):  # the task: write the reference backwards
        items = read_text2text(path, "mr", "text")
        return [type(i)(i.source, [r[::-1] for r in i.references]) for i in items]

    register_task(GenerationTask("backwards", reversed_texts))
    try:
        with pytest.raises(UserError, match="exists already"):
            register_task(GenerationTask("webnlg", reversed_texts))
        base = model_dir(tmp_path, "llama")
        code, stdout, stderr = run(
            capsys, "finetune", base, "--task", "backwards", "--data", task_dir, "--epochs", "1",
            "--max-train-samples", "8", "--out", tmp_path / "run", "--json", *FAST,
        )  # fmt: skip
        assert code == 0, stderr
        assert json.loads(stdout)["task"] == "backwards" and json.loads(stdout)["train_examples"] == 8
        options = TaskOptions(data=str(task_dir), max_train_samples=8, max_length=32, max_new_tokens=6)
        job = load_job(str(base), "backwards", options)
        reference = reversed_texts(task_dir / "train.jsonl", options)[0].references[0]
        assert job.distill_texts[0][0].endswith(f"Text: {reference}")  # the job's training text: its reader's
        assert job.train_count == 8 and "bleu" in job.final_scores(job.loaded.model)
    finally:
        GENERATION.pop("backwards", None)
    code, _, stderr = run(capsys, "finetune", base, "--task", "backwards", "--data", task_dir)
    assert code == 2 and "unknown task 'backwards'" in stderr

"""Paths a user meets that once handed back a wrong model, a traceback or a false record."""

import json

import pytest
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


LONG_TEXT = " ".join(["the movie was very good and the plot was quite nice"] * 8)  # about 90 tokens


def _short_gpt2(path) -> int:
    """A GPT-2 with 32 positions and a tokenizer; returns the position limit."""
    model = build("gpt2")
    model.save_pretrained(path)
    save_tokenizer(path)
    return model.config.n_positions


@pytest.mark.parametrize("where", [[], ["--in-memory"]])
def test_calibration_text_longer_than_the_positions_is_cut_to_them(tmp_path, cli, where):
    limit = _short_gpt2(tmp_path / "base")
    (tmp_path / "texts.txt").write_text(LONG_TEXT + "\nthe film was good\n")
    code, _, err = cli(
        "compress", tmp_path / "base", "--ratio", "0.5", "--calibration", tmp_path / "texts.txt",
        "--out", tmp_path / "out", *where,
    )  # fmt: skip
    assert code == 0, err
    recorded = json.loads((tmp_path / "out" / "fusion.json").read_text())["recipe"]["calibration"]
    assert recorded["max_length"] == limit and recorded["texts"] == 2


def test_the_default_recipe_samples_no_more_tokens_than_the_positions_hold(tmp_path, cli):
    limit = _short_gpt2(tmp_path / "base")
    code, _, err = cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "out")
    assert code == 0, err
    recorded = json.loads((tmp_path / "out" / "fusion.json").read_text())["recipe"]["calibration"]
    assert recorded["source"] == "sampled" and recorded["new_tokens"] == limit - 1


def test_roberta_positions_start_after_the_padding_index():
    from transformers import RobertaConfig, RobertaForCausalLM

    from mlp_fusion.batches import position_limit
    from mlp_fusion.diagnostics.perplexity import perplexity
    from mlp_fusion.loading import load_tokenizer

    config = RobertaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=40, is_decoder=True,
    )  # fmt: skip
    model = RobertaForCausalLM(config).eval()
    assert position_limit(model) == 40 - config.pad_token_id - 1
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(Path(folder))
        tokenizer = load_tokenizer(Path(folder))
    result = perplexity(model, tokenizer, [LONG_TEXT])
    assert result["max_length"] == 38 and result["tokens"] == 37


def test_finetune_records_the_calibration_texts_it_used(tmp_path, cli):
    from tiny_models import write_data_to_text_task

    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    write_data_to_text_task(tmp_path / "data", train=32, dev=4)
    code, _, err = cli(
        "finetune", tmp_path / "base", "--task", "text2text", "--source-column", "mr", "--target-column", "text", "--data", tmp_path / "data", "--ratio", "0.5",
        "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "fusion.json").read_text())["recipe"]["calibration"]
    assert recorded["source"] == "task" and recorded["texts"] == 32


def test_a_reloaded_and_resaved_model_keeps_its_recipe_and_samples(tmp_path, cli):
    from mlp_fusion import from_pretrained, save_pretrained

    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    assert cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "a")[0] == 0
    save_pretrained(from_pretrained(tmp_path / "a"), tmp_path / "b")
    for name in ("fusion.json", "calibration-samples.txt"):
        first, again = ((tmp_path / d / name).read_text() for d in ("a", "b"))
        if name == "fusion.json":
            first, again = (json.loads(text)["recipe"] for text in (first, again))
        assert first == again


def test_sampled_calibration_does_not_depend_on_the_models_generation_config(tmp_path, cli):
    from transformers import GenerationConfig

    build("llama").save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    assert cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "a")[0] == 0
    GenerationConfig(temperature=0.3, repetition_penalty=1.5, do_sample=True).save_pretrained(
        tmp_path / "base"
    )
    assert cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "b")[0] == 0
    samples = [(tmp_path / d / "calibration-samples.txt").read_text() for d in ("a", "b")]
    assert samples[0] == samples[1]


def test_the_default_uses_the_bos_id_the_models_config_gives(tmp_path, cli):
    """A tokenizer that names no BOS or EOS token, with a model config that gives their ids."""
    import transformers as tf

    model = build("llama")
    model.save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "base")
    tokenizer.bos_token, tokenizer.eos_token = None, None
    tokenizer.save_pretrained(tmp_path / "base")
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "base").bos_token_id is None
    code, _, err = cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", tmp_path / "out")
    assert code == 0, err
    fusion = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert fusion["recipe"]["name"] == "calibrated" and fusion["recipe"]["calibration"]["texts"] > 0


def test_a_bundled_zip_unpacks_once_into_the_cache_and_never_over_a_users_folder(tmp_path, monkeypatch):
    import zipfile

    from mlp_fusion import UserError
    from mlp_fusion.loading import _unpack_zip_parts, bundled_path

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("all-mpnet-base-v2/config.json", "{}")
        zipped.writestr("all-mpnet-base-v2/vocab.txt", "[PAD]\n")
    data = archive.read_bytes()
    packages = [tmp_path / "p1", tmp_path / "p2"]
    for number, (package, piece) in enumerate(zip(packages, (data[:100], data[100:])), 1):
        package.mkdir()
        (package / f"model.zip.00{number}").write_bytes(piece)
    target = tmp_path / "cache" / "mpnet"
    _unpack_zip_parts(packages, "all-mpnet-base-v2", target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "vocab.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["mpnet"]  # nothing left behind
    mine = tmp_path / "elsewhere" / "gemma3"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    monkeypatch.setenv("MLP_FUSION_CACHE", str(mine.parent))
    with pytest.raises(UserError, match="holds no converted gemma3"):
        bundled_path("gemma3")
    assert (mine / "notes.txt").read_text() == "mine"


def test_finetune_overwrite_never_replaces_a_folder_that_holds_no_run(tmp_path, cli):
    from tiny_models import write_sentiment_task

    write_sentiment_task(tmp_path / "data", train=16, dev=4)
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    args = ["finetune", "--task", "sst2", "--data", tmp_path / "data", "--out", out]
    assert refusal(*cli(*args, "--overwrite")[::2]).endswith(
        "more than a run's files, so it is never replaced; choose another --out"
    )
    assert (out / "thesis.tex").read_text() == "years of work"


def _contents(folder) -> dict:
    """Every file under ``folder`` (relative name -> bytes), to show a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fused_llama(tmp_path, cli):
    """A tiny decoder and its fused copy, side by side in ``tmp_path/models``."""
    models = tmp_path / "models"
    build("llama").save_pretrained(models / "base")
    assert cli("compress", models / "base", "--ratio", "0.5", "--out", models / "fused")[0] == 0
    return models


@pytest.mark.parametrize(
    "command",
    [
        ("compress", "base", "--ratio", "0.5"),
        ("compress", "base", "--ratio", "0.5", "--in-memory"),
        ("export", "fused"),
        ("upcycle", "base"),
    ],
    ids=["compress-streamed", "compress-in-memory", "export", "upcycle"],
)
@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_no_command_writes_over_the_model_it_reads(fused_llama, cli, command, where):
    verb, model, *options = command
    source = fused_llama / model
    out = source if where == "itself" else fused_llama
    (fused_llama / "config.json").write_text("{}")  # a parent that looks like a checkpoint is still refused
    before = _contents(fused_llama)
    line = refusal(*cli(verb, source, *options, "--out", out, "--overwrite")[::2])
    assert line.endswith("which writing there would replace; choose another directory")
    assert _contents(fused_llama) == before


def test_finetune_never_writes_over_the_model_it_trains(fused_llama, cli, tmp_path):
    from tiny_models import write_sentiment_task

    write_sentiment_task(tmp_path / "data", train=16, dev=4)
    run = fused_llama / "fused"
    (run / "run.json").write_text("{}")  # as if the model were an earlier run's output
    before = _contents(run)
    args = ["finetune", run, "--task", "sst2", "--data", tmp_path / "data", "--out", run, "--overwrite"]
    assert refusal(*cli(*args)[::2]).endswith("which writing there would replace; choose another directory")
    assert _contents(run) == before


@pytest.mark.parametrize(
    "command",
    [("compress", "base", "--ratio", "0.5"), ("export", "fused"), ("export", "fused", "--format", "gguf")],
    ids=["compress", "export", "export-gguf"],
)
def test_an_output_under_a_file_is_refused_in_one_line(fused_llama, cli, command):
    verb, model, *options = command
    (fused_llama / "notes").write_text("mine")
    line = refusal(*cli(verb, fused_llama / model, *options, "--out", fused_llama / "notes" / "out")[::2])
    assert "is a file, so" in line
    assert (fused_llama / "notes").read_text() == "mine"


@pytest.mark.parametrize(
    "command",
    [
        ("compress", "base", "--ratio", "0.5"),  # read a layer at a time
        ("compress", "base", "--ratio", "0.5", "--in-memory"),
        ("export", "fused"),  # folded a tensor at a time
        ("perplexity", "base", "--data", "text.txt"),
    ],
    ids=["compress-streamed", "compress-in-memory", "export", "perplexity"],
)
def test_a_weights_file_cut_short_is_refused_in_one_line(fused_llama, cli, command):
    verb, model, *options = command
    weights = fused_llama / model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (fused_llama / "text.txt").write_text("a few words\n")
    options = [fused_llama / o if o.endswith(".txt") else o for o in options]
    out = [] if verb == "perplexity" else ["--out", fused_llama / "out"]
    code, _, err = cli(verb, fused_llama / model, *options, *out)
    assert refusal(code, err).endswith("the file is damaged, save it again")
    assert not (fused_llama / "out").exists()


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("fused", ["--ratio", "0.5"], "is already fused; start again from the original model"),
        (
            "fused",
            ["--ratio", "0.5", "--layers", "1"],
            "is already fused; start again from the original model",
        ),
        ("base", ["--width", "1000"], "choose at most 24"),
        (
            "base",
            ["--ratio", "0.5", "--layers", "5-9"],
            "layer 5 is out of range: this model's MLP layers are 0-2",
        ),
    ],
    ids=["fused-again", "one-fused-layer", "too-wide", "no-such-layer"],
)
def test_what_compress_cannot_do_is_refused_before_any_sampling(
    fused_llama, cli, monkeypatch, model, options, message
):
    from mlp_fusion import recipes

    def no_sampling(*args, **kwargs):
        raise AssertionError("texts were sampled before the refusal")

    save_tokenizer(fused_llama / model)  # with a tokenizer the default recipe would sample texts
    monkeypatch.setattr(recipes, "sample_texts", no_sampling)
    code, _, err = cli("compress", fused_llama / model, *options, "--out", fused_llama / "again")
    assert refusal(code, err).endswith(message)
    assert not (fused_llama / "again").exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, out: m.compress(out.parent / "base", out, ratios=0.5), "unknown fusion setting 'ratios'"),
        (
            lambda m, out: m.compress(out.parent / "base", out, ratio=0.5, calibration_texts="one text"),
            "a list",
        ),
        (
            lambda m, out: m.compress(out.parent / "base", out, ratio=0.5, calibration_texts=[""]),
            "holds no text",
        ),
        (lambda m, out: m.save_pretrained(str(out.parent / "fused"), out), "loaded torch module, got str"),
        (lambda m, out: m.upcycle(out.parent / "base"), "loaded torch module, got PosixPath"),
        (lambda m, out: m.export(out.parent / "fused", out, tokenizer=object()), "give no tokenizer"),
        (
            lambda m, out: m.compress(out.parent / "base", out, {"ratio": 0.5}),
            "config must be a FusionConfig",
        ),
        (
            lambda m, out: m.compress(out.parent / "base", out, ratio=0.5, heal={"heal_steps": 2}),
            "HealSettings",
        ),
        (
            lambda m, out: m.finetune(out.parent / "base", "sst2", out, options={"data": "x"}),
            "TaskOptions, got",
        ),
        (
            lambda m, out: m.evaluate(out.parent / "fused", "sst2", load={"dtype": "float32"}),
            "LoadSettings, got",
        ),
        (
            lambda m, out: m.evaluate(out.parent / "fused", "sst2", predictions=out / "outputs.jsonl"),
            "sst2 generates none",
        ),
    ],
    ids=[
        "misspelt-field",
        "texts-as-one-string",
        "no-texts",
        "save-a-name",
        "upcycle-a-folder",
        "export-tokenizer",
        "config-as-dict",
        "heal-as-dict",
        "finetune-options-as-dict",
        "evaluate-load-as-dict",
        "evaluate-predictions-of-a-classifier",
    ],
)
def test_the_python_verbs_refuse_what_they_cannot_use(fused_llama, call, message):
    import mlp_fusion

    with pytest.raises(mlp_fusion.UserError, match=message):
        call(mlp_fusion, fused_llama / "out")
    assert not (fused_llama / "out").exists()


def test_export_of_a_saved_model_is_what_the_command_writes(fused_llama, cli):
    import mlp_fusion

    assert mlp_fusion.export(fused_llama / "fused", fused_llama / "library") == fused_llama / "library"
    assert cli("export", fused_llama / "fused", "--out", fused_llama / "command")[0] == 0
    written = [load_file(fused_llama / name / "model.safetensors") for name in ("library", "command")]
    assert written[0].keys() == written[1].keys()
    assert all(written[0][key].equal(written[1][key]) for key in written[0])


@pytest.mark.parametrize(
    "command",
    [
        ("compress", "base", "--ratio", "0.5"),
        ("export", "fused"),
        ("upcycle", "base"),
        ("finetune", "fused", "--task", "sst2", "--data", "data"),
    ],
    ids=["compress", "export", "upcycle", "finetune"],
)
@pytest.mark.parametrize("project", ["with-a-folder", "with-a-file-of-its-own", "config-without-weights"])
def test_overwrite_never_replaces_a_project_that_holds_a_config(fused_llama, cli, command, project):
    from tiny_models import write_sentiment_task

    write_sentiment_task(fused_llama / "data", train=16, dev=4)
    out = fused_llama / "project"
    out.mkdir()
    (out / "config.json").write_text('{"app": 1}')  # many projects have one
    if project == "with-a-folder":  # all that a checkpoint or a run holds, and a folder of the user's
        (out / "model.safetensors").write_bytes(b"")
        (out / "run.json").write_text("{}")
        (out / "src").mkdir()
        (out / "src" / "main.py").write_text("print('mine')")
    if project == "with-a-file-of-its-own":  # all that a checkpoint or a run holds, and the user's code
        (out / "model.safetensors").write_bytes(b"")
        (out / "run.json").write_text("{}")
        (out / "main.py").write_text("print('mine')")
    before = _contents(out)
    verb, model, *options = command
    options = [fused_llama / o if o == "data" else o for o in options]
    line = refusal(*cli(verb, fused_llama / model, *options, "--out", out, "--overwrite")[::2])
    assert "so --overwrite will not replace it" in line or "so it is never replaced" in line
    assert _contents(out) == before


def test_finetune_refuses_a_width_or_layer_it_cannot_give_before_loading(fused_llama, cli, monkeypatch):
    from tiny_models import write_sentiment_task

    from mlp_fusion.training import jobs

    def no_loading(*args, **kwargs):
        raise AssertionError("the model and data were loaded before the refusal")

    write_sentiment_task(fused_llama / "data", train=16, dev=4)
    monkeypatch.setattr(jobs, "load_job", no_loading)
    task = ["--task", "sst2", "--data", fused_llama / "data", "--out", fused_llama / "run"]
    for options, message in (
        (["--width", "999"], "choose at most 24"),
        (["--layers", "7"], "layer 7 is out of range"),
    ):
        assert message in refusal(*cli("finetune", fused_llama / "base", *task, *options)[::2])
    assert not (fused_llama / "run").exists()

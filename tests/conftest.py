import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny BERT saved as a plain local checkpoint (no tokenizer), for the command-line tests."""
    from tiny_models import build

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    build("bert").save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny LLaMA causal LM with the word-level tokenizer of the synthetic tasks."""
    from tiny_models import build, save_tokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    build("llama").save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture
def cli(capsys):
    """Run ``mlp-fusion ARGS``; returns (exit code, stdout, stderr)."""
    from mlp_fusion.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run

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

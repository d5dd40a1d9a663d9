"""Working memory: a layer's experts clustered in chunks that fit (same result), and sites that cannot fit refused."""

import pytest
import torch
from tiny_models import build, inputs, outputs

from mlp_fusion import FusionConfig, UserError, fuse, memory
from mlp_fusion.cli import main
from mlp_fusion.methods import clustering


def free_memory_for(monkeypatch, experts: float) -> None:
    """Pretend the machine has room for ``experts`` tiny experts' working sets (width 24 -> 12, 48 numbers)."""
    per_expert = memory.working_bytes(24, 48, 12)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(experts * per_expert / memory.USABLE))


@pytest.mark.parametrize(
    "family, method", [("mixtral", "fusion"), ("qwen3_moe", "cluster"), ("switch", "fold")]
)
def test_experts_clustered_in_chunks_give_the_same_model(monkeypatch, family, method):
    config, batch = FusionConfig(method=method, ratio=0.5, seed=3), inputs()
    whole = build(family)
    fuse(whole, config)
    calls = []
    real = clustering.k_means
    monkeypatch.setattr(
        clustering, "k_means", lambda rows, *a, **k: calls.append(rows.shape[0]) or real(rows, *a, **k)
    )
    free_memory_for(monkeypatch, 1.5)
    chunked = build(family)
    fuse(chunked, config)
    assert calls and max(calls) < 4  # a chunk of the 4 experts at a time
    assert torch.equal(outputs(chunked, batch), outputs(whole, batch))
    left, right = whole.state_dict(), chunked.state_dict()
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_a_site_that_does_not_fit_is_refused_before_anything_changes(monkeypatch):
    model, batch = build("llama"), inputs()
    before = outputs(model, batch)
    free_memory_for(monkeypatch, 0.5)
    with pytest.raises(UserError, match=r"not enough memory to fuse model\.layers\.0\.mlp .* is free on cpu"):
        fuse(model, FusionConfig(ratio=0.5))
    assert torch.equal(outputs(model, batch), before)
    assert not hasattr(model, "mlp_fusion_record")
    fuse(model, FusionConfig(method="prune", ratio=0.5))  # no k-means working set: not refused


@pytest.mark.parametrize("mode", [[], ["--in-memory"]])
def test_compress_refuses_a_site_that_does_not_fit_with_one_line(monkeypatch, capsys, tmp_path, mode):
    build("mixtral").save_pretrained(tmp_path / "base")
    free_memory_for(monkeypatch, 0.5)
    code = main(["compress", str(tmp_path / "base"), "--ratio", "0.5", "--out", str(tmp_path / "out"), *mode])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: not enough memory to fuse model.layers.0.mlp.experts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_available_memory_is_read_from_the_system():
    free = memory.available_bytes("cpu")
    assert 0 < free < 1 << 50

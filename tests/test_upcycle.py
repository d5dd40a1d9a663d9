"""Sparse upcycling: the MoE starts as the dense model's function, and fuses, saves and loads per expert."""

import pytest
import torch
from tiny_models import build, inputs, outputs

from mlp_fusion import FusionConfig, UserError, from_pretrained, fuse, save_pretrained, upcycle


@pytest.mark.parametrize("experts, top_k", [(4, 2), (3, 1)])
def test_upcycled_moe_computes_the_dense_function(experts, top_k):
    dense = build("llama")
    moe = upcycle(dense, num_experts=experts, top_k=top_k)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape[0] == experts
    batch = inputs()
    torch.testing.assert_close(outputs(moe, batch), outputs(dense, batch), rtol=1e-5, atol=1e-5)
    generated = moe.generate(batch["input_ids"][:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, dense.generate(batch["input_ids"][:1], max_new_tokens=5, do_sample=False))


def test_upcycled_moe_fuses_per_expert_saves_and_loads(tmp_path):
    moe = upcycle(build("llama"), num_experts=4, top_k=2)
    with torch.no_grad():  # let the experts differ, as after some fine-tuning
        moe.model.layers[1].mlp.experts.down_proj.add_(
            torch.randn_like(moe.model.layers[1].mlp.experts.down_proj) * 0.05
        )
        moe.model.layers[1].mlp.gate.weight.normal_(0, 0.5)
    report = fuse(moe, FusionConfig(ratio=0.5, layers=[1, 2]))
    assert sorted({(r.layer, r.expert) for r in report.layers}) == [(n, e) for n in (1, 2) for e in range(4)]
    save_pretrained(moe, tmp_path / "moe")
    batch = inputs()
    torch.testing.assert_close(outputs(from_pretrained(tmp_path / "moe"), batch), outputs(moe, batch))


def test_upcycle_refuses_what_it_cannot_copy():
    with pytest.raises(UserError, match="dense causal LM"):
        upcycle(build("bert"))
    with pytest.raises(UserError, match="top_k"):
        upcycle(build("llama"), num_experts=2, top_k=3)
    fused = build("llama")
    fuse(fused, FusionConfig(ratio=0.5))
    with pytest.raises(UserError, match="already fused"):
        upcycle(fused)


def test_upcycle_command_writes_a_vanilla_moe_checkpoint(tmp_path, capsys):
    import transformers

    from mlp_fusion.cli import main

    dense = build("llama")
    dense.save_pretrained(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "3", "--out", str(tmp_path / "moe")]) == 0
    assert "3 experts" in capsys.readouterr().out
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # plain transformers loads it
    torch.testing.assert_close(outputs(moe, inputs()), outputs(dense, inputs()), rtol=1e-5, atol=1e-5)
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe")]) == 2  # exists


def test_upcycle_command_refuses_expert_counts_before_loading(tmp_path, capsys, monkeypatch):
    from mlp_fusion import loading
    from mlp_fusion.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    build("llama").save_pretrained(tmp_path / "dense")
    monkeypatch.setattr(loading, "load_model", no_loading)
    for experts, top_k in (("0", "2"), ("2", "3"), ("4", "0")):
        command = ["upcycle", str(tmp_path / "dense"), "--experts", experts, "--top-k", top_k]
        assert main([*command, "--out", str(tmp_path / "moe")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and f"got {top_k} of {experts}" in error
    assert not (tmp_path / "moe").exists()

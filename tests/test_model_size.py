"""A whole-model size target: the share of the chosen MLPs' parameters that keeps that share of the model."""

import json

import pytest

import mlp_fusion
from mlp_fusion import UserError
from mlp_fusion.loading import bundled_path, load_model
from mlp_fusion.model_size import SIZE_PLAN, mlp_share_for_size, skeleton


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_size_is_spread_over_every_layer_and_reached(lm_dir):
    original = _parameters(load_model(str(lm_dir)).model)
    done = mlp_fusion.compress(str(lm_dir), None, recipe="paper", size=0.8)
    assert len(done.report.layers) == done.model.config.num_hidden_layers
    assert abs(_parameters(done.model) / original - 0.8) < 0.01


def test_a_size_only_over_the_chosen_layers(lm_dir):
    model = skeleton(str(lm_dir))
    assert mlp_share_for_size(model, 0.9, "0") < mlp_share_for_size(model, 0.9, "all") < 1


def test_sizes_that_cannot_be_reached_or_clash_are_refused(lm_dir, tmp_path, cli):
    with pytest.raises(UserError, match="smallest size"):
        mlp_fusion.compress(str(lm_dir), None, recipe="paper", size=0.05)
    with pytest.raises(UserError, match="not both"):
        mlp_fusion.compress(str(lm_dir), None, recipe="paper", size=0.8, ratio=0.5)
    for bad in (1.5, 0, "x"):
        with pytest.raises(UserError, match="size must"):
            mlp_fusion.compress(str(lm_dir), None, recipe="paper", size=bad)
    code, _, err = cli("compress", lm_dir, "--size", "0.8", "--ratio", "0.5", "--out", tmp_path / "x")
    assert code == 2 and "not allowed with" in err and not (tmp_path / "x").exists()


def test_cli_size_is_recorded_as_the_share_it_became(lm_dir, tmp_path, cli):
    code, _, _ = cli("compress", lm_dir, "--size", "0.85", "--recipe", "paper", "--out", tmp_path / "sized")
    assert code == 0
    sites = json.loads((tmp_path / "sized" / "fusion.json").read_text())["sites"]
    assert all(site["settings"][SIZE_PLAN] == sites[0]["settings"][SIZE_PLAN] < 1 for site in sites)


@pytest.mark.slow
def test_smollm2_at_the_size_of_ten_layers_at_half_width_keeps_five_sixths_of_every_mlp():
    model = skeleton(str(bundled_path("smollm2")))
    s1 = 121_243_968 / 134_515_008  # the parameters of layers 20-29 at 0.5 over the original's
    assert mlp_share_for_size(model, s1) == pytest.approx(5 / 6, abs=1e-9)

"""A whole-model size target: the fusion fields that keep that share of the model's parameters, by the plan
measured best for a cut of that size."""

import json

import pytest

import mlp_fusion
from mlp_fusion import UserError
from mlp_fusion.loading import bundled_path, load_model
from mlp_fusion.model_size import BLOCK_RATIO, fields_for_size, skeleton


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [0.9, 0.79])
def test_a_size_is_reached_by_its_plan(lm_dir, size):
    original = _parameters(load_model(str(lm_dir)).model)
    done = mlp_fusion.compress(str(lm_dir), None, recipe="paper", size=size)
    assert abs(_parameters(done.model) / original - size) < 0.01
    layers = {layer.layer for layer in done.report.layers}
    count = done.model.config.num_hidden_layers
    if size >= 0.8:  # a budget over every layer
        assert layers == set(range(count))
    else:  # a block of the last layers, each at BLOCK_RATIO or wider
        assert max(layers) == count - 1 and layers == set(range(min(layers), count)) and min(layers) > 0
        assert all(layer.width_after >= BLOCK_RATIO * layer.width_before - 1 for layer in done.report.layers)


def test_chosen_layers_get_one_ratio_over_them(lm_dir):
    model = skeleton(str(lm_dir))
    fields = fields_for_size(model, 0.9, "0")
    assert fields["layers"] == "0" and 0 < fields["ratio"] < 1


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


def test_cli_size_is_recorded_as_the_fields_it_became(lm_dir, tmp_path, cli):
    code, _, _ = cli("compress", lm_dir, "--size", "0.9", "--recipe", "paper", "--out", tmp_path / "sized")
    assert code == 0
    sites = json.loads((tmp_path / "sized" / "fusion.json").read_text())["sites"]
    assert all(site["settings"]["budget"] == sites[0]["settings"]["budget"] < 1 for site in sites)


@pytest.mark.slow
def test_smollm2_sizes_of_the_measured_cuts_give_the_plans_measured_best():
    model = skeleton(str(bundled_path("smollm2")))
    original = 134_515_008
    s1 = fields_for_size(model, 121_243_968 / original)  # layers 20-29 at 0.5
    assert s1["layers"] == "all" and s1["budget"] == pytest.approx(5 / 6, abs=1e-9)
    s2 = fields_for_size(model, 94_701_888 / original)  # layers 10-29 at 0.25
    assert s2["layers"] == "10-29" and s2["ratio"] == pytest.approx(0.25, abs=1e-9)

"""Calibration-aware fusion: input weighting, the least-squares refit, routed expert tokens."""

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, FOODS, NAMES, build, inputs, outputs

from mlp_fusion import FusionConfig, UserError, find_sites, fuse
from mlp_fusion.calibration import ModelRuns, _output_of, _run_to_site, calibrate_site, refit_output
from mlp_fusion.diagnostics import output_errors
from mlp_fusion.parametrizations import NeuronScale
from mlp_fusion.records import fusion_records


def calibration_batch():
    return inputs(seed=1, batch=16, length=12)


def scales(model):
    return [m.scale.clone() for m in model.modules() if isinstance(m, NeuronScale)]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_with_calibration_keeps_outputs(family):
    model, batch = build(family), inputs()
    before = outputs(model, batch)
    fuse(model, FusionConfig(ratio=1.0), calibration=calibration_batch())
    assert float((outputs(model, batch) - before).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_kept_neurons_with_calibration_are_the_original_ones(family):
    original, batch = build(family), calibration_batch()
    model = copy.deepcopy(original)
    fuse(model, FusionConfig(ratio=0.5, keep_fraction=0.5, refit=False), calibration=batch)
    rows = find_sites(original)[0].read().rows()
    fused = find_sites(model)[0].read()
    kept = fused.rows()[:, : fused.width // 2]
    # every kept row is one of the original rows, unchanged (distance 0 to its nearest original)
    nearest = torch.cdist(kept.double(), rows.double()).min(dim=-1).values
    assert float(nearest.max()) <= 1e-5


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "mixtral", "switch"])
def test_refit_lowers_the_layer_errors_on_calibration_inputs(family):
    original, batch = build(family), calibration_batch()
    plain, refitted = copy.deepcopy(original), copy.deepcopy(original)
    fuse(plain, FusionConfig(ratio=0.5, refit=False), calibration=batch)
    report = fuse(refitted, FusionConfig(ratio=0.5), calibration=batch)
    assert all(row.calibration_error is not None for row in report.layers)
    before = output_errors(original, plain, batch, "all")["mean_layer"]
    after = output_errors(original, refitted, batch, "all")["mean_layer"]
    assert after < before


@pytest.mark.parametrize("family", ["bert", "llama", "mixtral"])
def test_refit_keeps_the_scale_and_lowers_the_site_error(family):
    original, batch = build(family), calibration_batch()
    model, last = copy.deepcopy(original), find_sites(original)[-1]
    statistics = calibrate_site(ModelRuns(original, batch), last)
    fuse(model, FusionConfig(ratio=0.5, layers=[last.layer], refit=False), calibration=batch)
    site = find_sites(model)[-1]
    scale_before = scales(model)
    error_before = site_error(model, site, batch, statistics.targets)
    error = refit_output(ModelRuns(model, batch), site, statistics, ridge=0.1)
    assert all(torch.equal(a, b) for a, b in zip(scale_before, scales(model)))
    assert error < error_before
    assert error == pytest.approx(site_error(model, site, batch, statistics.targets), rel=1e-4)


def site_error(model, site, batch, targets):
    _, hidden = _run_to_site(ModelRuns(model, batch), site)
    fitted = [_output_of(site, index, h) for index, h in enumerate(hidden)]
    squared = sum(float((f - t).double().pow(2).sum()) for f, t in zip(fitted, targets))
    return (squared / sum(float(t.double().pow(2).sum()) for t in targets)) ** 0.5


def test_refit_without_ridge_is_the_least_squares_solution():
    original, batch = build("bert"), calibration_batch()
    model = copy.deepcopy(original)
    last = find_sites(original)[-1]
    targets = calibrate_site(ModelRuns(original, batch), last).targets[0].double()
    fuse(model, FusionConfig(ratio=0.5, layers=[last.layer], ridge=0.0), calibration=batch)
    site = find_sites(model)[-1]
    _, hidden = _run_to_site(ModelRuns(model, batch), site)
    scale = site.output.parametrizations.weight[0].scale.reshape(-1).double()
    design = torch.cat([hidden[0].double() * scale, torch.ones(len(targets), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, targets).solution
    stored = site.output.parametrizations.weight.original.detach().double()
    torch.testing.assert_close(stored.T, solution[:-1].to(stored.dtype), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(site.output.bias.detach().double(), solution[-1], rtol=1e-4, atol=1e-5)


def test_experts_see_the_tokens_routed_to_them():
    model, batch = build("mixtral"), calibration_batch()
    site = find_sites(model)[0]
    statistics = calibrate_site(ModelRuns(model, batch), site)
    tokens = int(batch["attention_mask"].sum())
    assert sum(len(x) for x in statistics.inputs) == tokens * model.config.num_experts_per_tok
    assert all(len(x) == len(y) for x, y in zip(statistics.inputs, statistics.targets))


def test_weighting_changes_the_clusters_and_is_undone():
    original, batch = build("llama"), calibration_batch()
    weighted, unweighted = copy.deepcopy(original), copy.deepcopy(original)
    fuse(weighted, FusionConfig(ratio=0.5, refit=False), calibration=batch)
    fuse(unweighted, FusionConfig(ratio=0.5, refit=False, weighting=False), calibration=batch)
    plain = copy.deepcopy(original)
    fuse(plain, FusionConfig(ratio=0.5))
    a, b, c = (find_sites(m)[0].read().rows() for m in (weighted, unweighted, plain))
    assert torch.equal(b, c)  # without weighting or refit, calibration changes nothing
    assert not torch.allclose(a, c)
    # undone: at full width every weighted cluster is one neuron, and the model computes what it did
    full, probe = copy.deepcopy(original), inputs()
    fuse(full, FusionConfig(ratio=1.0, refit=False), calibration=batch)
    assert (outputs(full, probe) - outputs(original, probe)).abs().max() <= 1e-5


def test_bad_calibration_batch_is_refused():
    model = build("bert")
    with pytest.raises(UserError, match="calibration"):
        fuse(model, FusionConfig(), calibration={"input_ids": torch.ones(3)})


def test_compress_and_ntk_with_a_calibration_file(cli, lm_dir, tmp_path):
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(f"{name} likes {food} in the north" for name in NAMES for food in FOODS))
    code, stdout, _ = cli(
        "compress",
        lm_dir,
        "--ratio",
        "0.5",
        "--calibration",
        texts,
        "--out",
        tmp_path / "fused",
        "--json",
    )
    assert code == 0
    report = json.loads(stdout)
    assert all(row["calibration_error"] is not None for row in report["layers"])
    code, stdout, _ = cli(
        "ntk", lm_dir, "--methods", "fusion,prune", "--ratios", "0.5", "--probes", "4",
        "--calibration", texts, "--calibration-samples", "8", "--json",
    )  # fmt: skip
    assert code == 0
    assert all(row["calibrated"] for row in json.loads(stdout)["rows"])


def test_compress_refuses_bad_calibration_before_writing(cli, lm_dir, model_dir, tmp_path):
    texts = tmp_path / "calibration.txt"
    texts.write_text("the film is good\n")
    out = tmp_path / "fused"
    for args, message in [
        ((lm_dir, "--calibration", tmp_path / "missing.txt"), "cannot read calibration file"),
        ((lm_dir, "--calibration", texts, "--calibration-samples", "0"), "--calibration-samples"),
        ((model_dir, "--calibration", texts), "tokenizer"),
        ((lm_dir, "--calibration", texts, "--ridge", "-2"), "ridge"),
    ]:
        code, stdout, stderr = cli("compress", *args, "--out", out)
        assert code == 2 and stdout == "" and message in stderr, args
        assert not out.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reconstruction_lowers_the_calibration_error_and_keeps_the_scales(family):
    batch = calibration_batch()
    refitted, fitted = build(family), build(family)
    config = FusionConfig(ratio=0.5, keep_fraction=0.5)
    before = fuse(refitted, config, calibration=batch)
    after = fuse(fitted, FusionConfig(ratio=0.5, keep_fraction=0.5, reconstruct_steps=50), calibration=batch)
    for early, late in zip(before.layers, after.layers):
        assert late.calibration_error < early.calibration_error
    assert all(torch.equal(a, b) for a, b in zip(scales(refitted), scales(fitted)))
    weights = [p for n, p in fitted.named_parameters() if "mlp" in n]
    assert any(
        not torch.equal(p, q)
        for p, q in zip(weights, [p for n, p in refitted.named_parameters() if "mlp" in n])
    )


def test_reconstruction_leaves_sites_that_are_not_one_mlp_module_as_refitted():
    """A BERT site is the whole layer (its output projection feeds a residual and a norm): not fitted."""
    batch = calibration_batch()
    refitted, asked = build("bert"), build("bert")
    fuse(refitted, FusionConfig(ratio=0.5), calibration=batch)
    fuse(asked, FusionConfig(ratio=0.5, reconstruct_steps=20), calibration=batch)
    assert all(torch.equal(a, b) for a, b in zip(refitted.state_dict().values(), asked.state_dict().values()))


def test_reconstruct_steps_must_be_a_whole_number_at_least_zero():
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="reconstruct_steps"):
            FusionConfig(reconstruct_steps=bad)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_calibration_walk_leaves_the_model_whole_and_in_its_mode(family):
    model, whole_runs = build(family), build(family)
    layers = list(model.model.layers)
    model.train()
    config, batch = FusionConfig(ratio=0.5, layers="0,2"), calibration_batch()
    report = fuse(model, config, calibration=batch)
    assert model.training and all(m.training for m in model.modules())  # the mode it was given back
    assert list(model.model.layers) == layers  # no recorder left in place of a layer
    assert sorted({row.layer for row in report.layers}) == [0, 2]
    fuse(whole_runs, config, calibration=ModelRuns(whole_runs, batch))
    # each layer was fused by a call of its own, yet the records are those of one call
    assert [r.settings for r in fusion_records(model)] == [r.settings for r in fusion_records(whole_runs)]

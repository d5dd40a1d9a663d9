"""Per-site widths from a parameter budget."""

import pytest
import torch
from tiny_models import build, inputs

from mlp_fusion import FusionConfig, UserError, find_sites, fuse
from mlp_fusion.budget import WidthCurve, allocate_widths, output_error, width_curve
from mlp_fusion.calibration import MICRO_BATCH, ModelRuns, calibrate_hidden


def curve(full, steepness, cost):
    """Error falling linearly from ``steepness * full`` at width 0 to 0 at ``full``."""
    return WidthCurve([1, full], [steepness * (full - 1), 0.0], cost)


def test_allocation_meets_the_budget_and_follows_sensitivity():
    curves = [curve(40, 1.0, 3), curve(40, 5.0, 3), curve(20, 2.0, 7)]
    budget = 150
    widths = allocate_widths(curves, budget)
    spent = sum(w * c.neuron_cost for w, c in zip(widths, curves))
    assert spent <= budget
    # no site that is not full could take one more neuron within the budget
    assert all(w == c.widths[-1] or spent + c.neuron_cost > budget for w, c in zip(widths, curves))
    # per parameter: site 1 gains 5/3, site 2 gains 2/7, site 0 gains 1/3 -> site 1 fills first, then site 0
    assert widths[1] == 40 and widths[0] == (150 - 40 * 3 - 7) // 3 and widths[2] == 1


def test_allocation_from_a_ratio_stays_within_a_factor_of_two_of_uniform():
    curves = [curve(40, 1.0, 3), curve(40, 50.0, 3), curve(20, 0.0, 7)]  # site 2: no error at any width
    budget = int(0.25 * (40 * 3 + 40 * 3 + 20 * 7))  # 95 parameters
    widths = allocate_widths(curves, budget, 0.25)
    # floors 5, 5, 2 (uniform / 2), caps 20, 20, 10 (uniform x 2): site 1 fills to its cap, site 0 takes
    # the rest, and the flat site keeps its floor instead of dropping to one neuron
    assert widths == [(95 - 20 * 3 - 2 * 7) // 3, 20, 2]
    assert sum(w * c.neuron_cost for w, c in zip(widths, curves)) <= budget


def test_interpolated_curve():
    c = WidthCurve([1, 5, 9], [8.0, 4.0, 0.0], 1)
    assert c.error(3) == pytest.approx(6.0) and c.error(9) == 0.0 and c.error(7) == pytest.approx(2.0)


@pytest.mark.parametrize("family", ["bert", "llama", "mixtral"])
def test_fuse_with_a_budget_keeps_that_share_of_the_parameters(family):
    model = build(family)
    before = {site.name: site for site in find_sites(model)}
    chosen = [s for s in before.values() if s.layer in (1, 2)]
    costs = {s.name: s.read() for s in chosen}
    cost = {
        n: sub.batch * (sum(t.shape[-1] for t in sub.inputs) + sub.output.shape[-1])
        for n, sub in costs.items()
    }
    total = sum(cost[s.name] * s.width for s in chosen)
    report = fuse(model, FusionConfig(budget=0.4, layers="1-2"))
    widths = {row.name: row.width_after for row in report.layers}
    kept = sum(cost[name] * width for name, width in widths.items())
    assert kept <= int(0.4 * total)
    assert kept > int(0.4 * total) - max(cost.values())
    for site in find_sites(model):
        if site.name in widths:
            assert site.width == widths[site.name]


def test_budget_is_exclusive_with_ratio_and_width():
    with pytest.raises(UserError, match="one of a ratio"):
        FusionConfig(budget=0.5, ratio=0.5)
    with pytest.raises(UserError, match="budget must be in"):
        FusionConfig(budget=1.5)


def test_output_error_is_the_fused_output_error_for_linear_hidden_activations():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    w_in = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    d = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 3])
    hidden = x @ w_in.T  # identity activation: a mean neuron's activation is the mean activation
    counts = torch.bincount(labels, minlength=4).double()
    mean_in = torch.stack([w_in[labels == j].mean(0) for j in range(4)])
    mean_out = torch.stack([d[labels == j].mean(0) for j in range(4)])
    fused = (x @ mean_in.T) * counts @ mean_out  # centroids with the cluster sizes as the scale
    expected = float((hidden @ d - fused).pow(2).sum())
    gram = hidden.T @ hidden
    assert output_error(gram, d, labels, 4) == pytest.approx(expected, rel=1e-10)
    assert output_error(gram, d, torch.arange(12), 12) == pytest.approx(0.0, abs=1e-18)


def test_calibrated_curve_sees_the_data_and_the_budget_is_still_met():
    model, batch = build("llama"), inputs(seed=1, batch=16, length=12)
    site = find_sites(model)[1]
    sub = site.read()
    _, hidden = calibrate_hidden(ModelRuns(model, batch), site)
    measured = width_curve(sub, True, 0, hidden)
    assert measured.errors[-1] == 0.0 and measured.errors == sorted(measured.errors, reverse=True)
    silent = width_curve(sub, True, 0, [h * 0 for h in hidden])  # no activation: no output error
    assert max(silent.errors) == 0.0 and max(width_curve(sub, True, 0).errors) > 0
    fused = build("llama")
    total = sum(s.read().row_length * s.width for s in find_sites(fused) if s.layer in (1, 2))
    report = fuse(fused, FusionConfig(budget=0.4, layers="1-2"), calibration=batch)
    kept = sum(sub.row_length * row.width_after for row in report.layers)
    assert int(0.4 * total) - sub.row_length < kept <= int(0.4 * total)
    assert all(5 <= row.width_after <= 19 for row in report.layers)  # within a factor 2 of 0.4 x 24


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_calibrated_budget_walks_the_layers_and_matches_running_the_whole_model_per_site(family):
    """With a budget and a tokenised batch, the sensitivities come from one walk over the unfused layers and
    the fusion from a second: the embeddings run twice per micro-batch, not three times per site, and the
    widths and tensors are those of running the whole model for every site."""
    batch, config = inputs(seed=2, batch=16, length=12), FusionConfig(budget=0.5, layers="all")
    walked, whole = build(family), build(family)
    for model in (walked, whole):  # one site whose error weighs far more than the others'
        with torch.no_grad():
            for slot in find_sites(model)[0].slots():
                if slot.role == "output":
                    getattr(slot.module, slot.attr).mul_(30)
    calls = []
    walked.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    walked_report = fuse(walked, config, calibration=batch)
    whole_report = fuse(whole, config, calibration=ModelRuns(whole, batch))
    assert len(calls) == 2 * -(-len(batch["input_ids"]) // MICRO_BATCH)
    assert [r.width_after for r in walked_report.layers] == [r.width_after for r in whole_report.layers]
    assert len({r.width_after for r in walked_report.layers}) > 1  # the budget was spread, not uniform
    for (name, a), b in zip(walked.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

"""Every supported family, on tiny models built from configs."""

import copy

import pytest
import torch
import transformers
from tiny_models import FAMILIES, build, duplicate_neurons, inputs, outputs

import mlp_fusion
from mlp_fusion import FusionConfig, find_sites, fuse
from mlp_fusion.parametrizations import NeuronScale


def max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("canonical", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_reproduces_outputs(family, canonical):
    model, batch = build(family), inputs()
    before = outputs(model, batch)
    report = fuse(model, FusionConfig(method="fusion", ratio=1.0, canonical=canonical))
    assert max_diff(outputs(model, batch), before) <= 1e-5
    assert report.params_after == report.params_before
    assert all(row.width_after == row.width_before for row in report.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_with_kept_neurons_reproduces_outputs(family):
    model, batch = build(family), inputs()
    before = outputs(model, batch)
    fuse(model, FusionConfig(method="fusion", ratio=1.0, keep_fraction=0.5))
    assert max_diff(outputs(model, batch), before) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_neurons_fuse_exactly(family):
    model, batch = build(family), inputs()
    half = duplicate_neurons(model)
    before = outputs(model, batch)
    report = fuse(model, FusionConfig(method="fusion", width=half))
    assert max(row.inertia for row in report.layers) <= 1e-6
    assert max_diff(outputs(model, batch), before) <= 1e-5


SYMMETRIC_FAMILIES = ["gemma2", "gemma3", "llama", "mixtral", "qwen2", "qwen2_moe", "qwen3_moe", "switch"]


@pytest.mark.parametrize("family", SYMMETRIC_FAMILIES)
def test_duplicates_up_to_a_symmetry_fuse_exactly(family):
    model, batch = build(family), inputs()
    half = duplicate_neurons(model, symmetric=True)
    before = outputs(model, batch)
    raw = copy.deepcopy(model)
    report = fuse(model, FusionConfig(method="fusion", width=half))
    assert max(row.inertia for row in report.layers) <= 1e-6
    assert max_diff(outputs(model, batch), before) <= 1e-5
    # The paper's raw clustering sees the copies as different vectors: it cannot merge them exactly.
    raw_report = fuse(raw, FusionConfig(method="fusion", width=half, canonical=False))
    assert max(row.inertia for row in raw_report.layers) > 1e-3


def test_symmetry_of_each_family():
    expected = {family: "gated" for family in SYMMETRIC_FAMILIES} | {"switch": "homogeneous"}
    for family in FAMILIES:
        assert {site.symmetry for site in find_sites(build(family))} == {expected.get(family, "none")}, family


@pytest.mark.parametrize("family", SYMMETRIC_FAMILIES)
def test_cluster_is_exact_on_duplicates_where_the_activation_allows(family):
    model, batch = build(family), inputs()
    half = duplicate_neurons(model)
    before = outputs(model, batch)
    fuse(model, FusionConfig(method="cluster", width=half))
    assert max_diff(outputs(model, batch), before) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_scale_buffer_and_report(family):
    model = build(family)
    widths = {site.name: site.width for site in find_sites(model)}
    report = fuse(model, FusionConfig(method="fusion", ratio=0.5, layers="1-2"))
    for site in find_sites(model):
        expected = round(widths[site.name] * 0.5) if site.layer in (1, 2) else widths[site.name]
        assert site.width == expected, site.name
    scales = [m for m in model.modules() if isinstance(m, NeuronScale)]
    assert scales, "fusion must attach the fixed scale"
    scale_ids = {id(m.scale) for m in scales}
    assert not scale_ids & {id(p) for p in model.parameters()}
    assert any(k.endswith(".scale") for k in model.state_dict())
    assert model.to(torch.float64) is model and all(m.scale.dtype == torch.float64 for m in scales)
    assert report.params_after < report.params_before
    assert report.mlp_flops_after < report.mlp_flops_before
    assert {row.layer for row in report.layers} == {1, 2}
    assert all(row.inertia is not None and row.seconds >= 0 for row in report.layers)


@pytest.mark.parametrize("method", ["fusion", "prune", "svd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_outputs(family, method, tmp_path):
    model, batch = build(family), inputs()
    fuse(model, FusionConfig(method=method, ratio=0.5, layers="0-1"))
    expected = outputs(model, batch)
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    loaded = mlp_fusion.from_pretrained(tmp_path / "fused")
    assert type(loaded) is type(model)
    assert torch.equal(outputs(loaded, batch), expected)
    assert [(s.name, s.width) for s in find_sites(loaded)] == [(s.name, s.width) for s in find_sites(model)]


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt2"])
def test_save_load_keeps_the_dtype(family, tmp_path):
    model, batch = build(family).to(torch.bfloat16), inputs()
    fuse(model, FusionConfig(ratio=0.5))
    expected = outputs(model, batch)
    mlp_fusion.save_pretrained(model, tmp_path / "fused")
    loaded = mlp_fusion.from_pretrained(tmp_path / "fused")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(outputs(loaded, batch), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_vanilla_transformers(family, tmp_path):
    model, batch = build(family), inputs()
    fuse(model, FusionConfig(method="fusion", ratio=0.5))  # every layer: uniform widths
    expected = outputs(model, batch)
    mlp_fusion.export(model, tmp_path / "plain")
    model_class = getattr(transformers, type(model).__name__)
    plain = model_class.from_pretrained(tmp_path / "plain", experts_implementation="eager").eval()
    assert max_diff(outputs(plain, batch), expected) <= 1e-5
    assert not any(isinstance(m, NeuronScale) for m in plain.modules())


def test_export_refuses_mixed_widths(tmp_path):
    model = build("bert")
    fuse(model, FusionConfig(ratio=0.5, layers=[1]))
    with pytest.raises(mlp_fusion.UserError, match="different widths"):
        mlp_fusion.export(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_model_without_mlp_is_refused():
    with pytest.raises(mlp_fusion.UserError, match="supported families"):
        fuse(torch.nn.Sequential(torch.nn.Linear(3, 3)), FusionConfig())
    with pytest.raises(mlp_fusion.UserError, match="load it first"):  # a name, not a model
        fuse("smollm2", FusionConfig())


@pytest.mark.parametrize("family", ["bert", "llama", "mixtral", "gpt2"])
def test_export_leaves_the_callers_model_and_its_copies_working(family, tmp_path):
    model, batch = build(family), inputs()
    fuse(model, FusionConfig(method="fusion", ratio=0.5))
    expected = outputs(model, batch)
    twin = copy.deepcopy(model)
    mlp_fusion.export(model, tmp_path / "plain")
    assert torch.equal(outputs(model, batch), expected)
    assert torch.equal(outputs(twin, batch), expected)
    mlp_fusion.export(twin, tmp_path / "plain-twin")
    assert torch.equal(outputs(model, batch), expected) and torch.equal(outputs(twin, batch), expected)
    assert any(isinstance(m, NeuronScale) for m in model.modules())


def test_layers_can_name_one_stack_of_an_encoder_decoder():
    model = build("switch")
    report = fuse(model, FusionConfig(ratio=0.5, layers="decoder:1,encoder:3"))
    chosen = {(row.name.split(".")[0], row.layer) for row in report.layers}
    assert chosen == {("decoder", 1), ("encoder", 3)}
    assert FusionConfig(layers="1,decoder:2-3").layers == [1, "decoder:2", "decoder:3"]
    with pytest.raises(mlp_fusion.UserError, match="unknown stack"):
        FusionConfig(layers="middle:1")
    with pytest.raises(mlp_fusion.UserError, match="decoder stack's MLP layers are 0-3"):
        fuse(build("switch"), FusionConfig(layers="decoder:7"))
    with pytest.raises(mlp_fusion.UserError, match="no MLP in a encoder stack"):
        fuse(build("llama"), FusionConfig(layers="encoder:1"))


def test_each_stack_width_goes_to_its_own_config_field(tmp_path):
    config = transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=20, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartModel(config).eval()
    keys = {site.name: site.config_key for site in find_sites(model)}
    assert {k for n, k in keys.items() if ".decoder." in f".{n}"} == {"decoder_ffn_dim"}
    assert {k for n, k in keys.items() if ".encoder." in f".{n}"} == {"encoder_ffn_dim"}
    batch = inputs()
    fuse(model, FusionConfig(ratio=0.5))
    expected = outputs(model, batch)
    mlp_fusion.export(model, tmp_path / "plain")
    plain = transformers.BartModel.from_pretrained(tmp_path / "plain").eval()
    assert (plain.config.encoder_ffn_dim, plain.config.decoder_ffn_dim) == (12, 10)
    assert max_diff(outputs(plain, batch), expected) <= 1e-5


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "mixtral", "switch"])
def test_the_models_own_save_pretrained_writes_the_fused_format(family, tmp_path):
    model, batch = build(family), inputs()
    fuse(model, FusionConfig(ratio=0.5, layers="1-2"))
    expected = outputs(model, batch)
    model.save_pretrained(tmp_path / "native")
    loaded = mlp_fusion.from_pretrained(tmp_path / "native")
    assert torch.equal(outputs(loaded, batch), expected)
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(outputs(mlp_fusion.from_pretrained(tmp_path / "again"), batch), expected)
    twin = copy.deepcopy(model)
    twin.save_pretrained(tmp_path / "twin")
    assert torch.equal(outputs(mlp_fusion.from_pretrained(tmp_path / "twin"), batch), expected)


def test_stacked_expert_widths_from_a_ratio_keep_the_grouped_kernel():
    model = build("mixtral")  # float32: rows stay aligned at a multiple of 4 neurons
    before = model.config._experts_implementation
    fuse(model, FusionConfig(ratio=0.45))  # 0.45 x 24 = 10.8 -> 11: not aligned; 12 is within an eighth
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 12
    assert model.config._experts_implementation == before
    exact = build("mixtral")
    fuse(exact, FusionConfig(width=7))  # asked for exactly: kept, and the eager loop takes over
    assert exact.model.layers[0].mlp.experts.down_proj.shape[-1] == 7
    assert exact.config._experts_implementation == "eager"
    small = build("qwen3_moe")  # 0.5 x 20 = 10: 8 or 12 would move it by a fifth, so 10 it stays
    fuse(small, FusionConfig(ratio=0.5))
    assert small.model.layers[0].mlp.experts.down_proj.shape[-1] == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_svd_computes_with_its_two_factors_and_exports(family, tmp_path, monkeypatch):
    model, batch = build(family), inputs()
    fuse(model, FusionConfig(method="svd", ratio=0.5))
    built = []
    original = mlp_fusion.parametrizations.LowRank.forward
    monkeypatch.setattr(
        mlp_fusion.parametrizations.LowRank,
        "forward",
        lambda self, a, b: built.append(1) or original(self, a, b),
    )
    factored = outputs(model, batch)
    builds = len(built)
    for module in model.modules():
        module.__dict__.pop("forward", None)
    assert max_diff(factored, outputs(model, batch)) <= 1e-5
    unfactored_builds = len(built) - builds
    assert 0 < unfactored_builds and builds <= unfactored_builds
    # Stacked expert tensors still build their full weight (the experts' own forward reads it), and so does
    # Switch's dense MLP, which reads wo.weight for its dtype; every other svd layer uses its factors only.
    stacked = any(site.experts and not hasattr(site, "members") for site in find_sites(model))
    assert builds == 0 or stacked or family == "switch"
    fuse_again = build(family)
    fuse(fuse_again, FusionConfig(method="svd", ratio=0.5))
    mlp_fusion.export(fuse_again, tmp_path / "plain")
    plain = getattr(transformers, type(model).__name__).from_pretrained(tmp_path / "plain").eval()
    assert max_diff(outputs(plain, batch), factored) <= 1e-5


@pytest.mark.parametrize("zeroed", ["up_proj", "down_proj"])
def test_full_width_keeps_a_half_dead_neuron_trainable(zeroed):
    """A neuron with a zero up row (or down column) computes nothing, but its other row still gets gradient;
    canonical clustering at full width must keep both rows, not zero them."""
    model = build("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        if zeroed == "up_proj":
            mlp.up_proj.weight[3] = 0
        else:
            mlp.down_proj.weight[:, 3] = 0
    before = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1).clone()
    fuse(model, FusionConfig(method="fusion", ratio=1.0, layers="0"))
    after = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1)
    nearest = torch.cdist(before, after).min(dim=1).values  # clustering may reorder the neurons
    assert float(nearest.max()) <= 1e-5 * float(before.norm(dim=1).max())

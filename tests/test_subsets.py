"""Random, stratified subsets of a task's data: every group keeps its share, seeded, the first N still there."""

import json
from collections import Counter
from pathlib import Path

import pytest

from mlp_fusion.training.data import load_task_data
from mlp_fusion.training.generation import load_generation_data
from mlp_fusion.training.subsets import stratified_indices
from mlp_fusion.training.tasks import CLASSIFICATION, GENERATION, TaskOptions

WEBNLG = Path(__file__).resolve().parents[2] / "shared" / "data" / "webnlg2017" / "enriched_v1.6_flat"


def test_each_stratum_keeps_its_share_and_the_draw_is_seeded():
    strata = ["a"] * 60 + ["b"] * 30 + ["c"] * 10  # sorted, as data files often are
    chosen = stratified_indices(strata, 20, seed=1)
    assert len(chosen) == len(set(chosen)) == 20 and chosen == sorted(chosen)
    assert Counter(strata[i] for i in chosen) == {"a": 12, "b": 6, "c": 2}
    assert stratified_indices(strata, 20, seed=1) == chosen
    assert stratified_indices(strata, 20, seed=2) != chosen
    assert stratified_indices(strata, 500, seed=1) == list(range(100))


def test_remainders_go_to_the_largest_fractions():
    strata = ["a"] * 5 + ["b"] * 3 + ["c"] * 2  # shares of 4: 2.0, 1.2, 0.8
    assert Counter(strata[i] for i in stratified_indices(strata, 4, seed=0)) == {"a": 2, "b": 1, "c": 1}


def _sorted_webnlg(path: Path) -> None:
    """A WebNLG file sorted by category, three categories, one to three triples each, two texts each."""
    lines = []
    for category in ("Airport", "Food", "University"):
        for number in range(30):
            triples = [f"S{number} | p{k} | O{k}" for k in range(number % 3 + 1)]
            texts = [{"text": f"{category} text {number} {k}"} for k in range(2)]
            lines.append({"category": category, "modifiedtripleset": triples, "lex": texts})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _options(tmp_path, **fields) -> TaskOptions:
    _sorted_webnlg(tmp_path / "train.jsonl")
    _sorted_webnlg(tmp_path / "dev.jsonl")
    return TaskOptions(data=tmp_path, max_train_samples=36, max_eval_samples=18, **fields)


def test_a_random_draw_covers_every_category_of_a_sorted_file(tmp_path):
    first = load_generation_data(GENERATION["webnlg"], _options(tmp_path))
    assert {item.category for item in first.train} == {"Airport"}
    assert sum(len(item.references) for item in first.train) == 36
    drawn = load_generation_data(GENERATION["webnlg"], _options(tmp_path, sample="random", sample_seed=3))
    assert sum(len(item.references) for item in drawn.train) == 36  # 4 pairs of each of the 9 strata
    assert Counter(item.category for item in drawn.train for _ in item.references) == dict.fromkeys(
        ("Airport", "Food", "University"), 12
    )
    # strata of category x triples: 9 of 10 items each, so 2 of each in 18
    assert Counter(item.category for item in drawn.eval) == dict.fromkeys(
        ("Airport", "Food", "University"), 6
    )
    assert Counter(item.triples for item in drawn.eval) == {1: 6, 2: 6, 3: 6}


def test_the_training_draw_follows_the_seed_and_the_evaluation_draw_does_not(tmp_path):
    runs = [
        load_generation_data(GENERATION["webnlg"], _options(tmp_path, sample="random", sample_seed=s))
        for s in (1, 2)
    ]
    assert [i.index for i in runs[0].eval] == [i.index for i in runs[1].eval]
    assert [(i.index, i.references) for i in runs[0].train] != [
        (i.index, i.references) for i in runs[1].train
    ]
    assert all(item.index is not None for item in runs[0].eval)


def test_a_classification_draw_keeps_each_labels_share(tmp_path):
    lines = ["sentence\tlabel"] + [f"text {n}\t{int(n >= 80)}" for n in range(100)]  # sorted by label
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    task = CLASSIFICATION["sst2"]
    first = load_task_data(task, data=tmp_path, max_train_samples=10)
    assert set(first.train.labels) == {0}
    drawn = load_task_data(task, data=tmp_path, max_train_samples=10, sample="random", sample_seed=4)
    assert Counter(drawn.train.labels) == {0: 8, 1: 2}


def test_an_unknown_sample_is_refused(cli, tmp_path):
    code, _, err = cli("finetune", "--task", "sst2", "--data", tmp_path, "--sample", "middle")
    assert code == 2 and "--sample" in err


@pytest.mark.skipif(not WEBNLG.is_dir(), reason="needs the WebNLG 2017 files in ../shared/data")
def test_on_webnlg_the_first_thousand_pairs_hold_two_categories_and_a_random_draw_all_ten():
    options = dict(train_file=WEBNLG / "train.jsonl", eval_file=WEBNLG / "dev.jsonl", max_train_samples=1000)
    first = load_generation_data(GENERATION["webnlg"], TaskOptions(**options))
    drawn = load_generation_data(GENERATION["webnlg"], TaskOptions(**options, sample="random"))
    assert len({item.category for item in first.train}) == 2
    assert len({item.category for item in drawn.train}) == 10
    assert sum(len(item.references) for item in drawn.train) == 1000

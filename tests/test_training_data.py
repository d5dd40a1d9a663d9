"""Task data readers and the GLUE metrics, against independent implementations and hand-computed values."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from mlp_fusion.errors import UserError
from mlp_fusion.training.data import load_task_data
from mlp_fusion.training.metrics import accuracy, f1, matthews, pearson, score, spearman
from mlp_fusion.training.tasks import get_task


def test_metrics_by_hand():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert accuracy(predictions, labels) == pytest.approx(3 / 5)
    assert f1(predictions, labels) == pytest.approx(2 * 2 / (3 + 3))  # tp 2, predicted 3, true 3
    # tp 2, tn 1, fp 1, fn 1: (2*1 - 1*1) / sqrt(3*3*2*2)
    assert matthews(predictions, labels) == pytest.approx(1 / 6)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # ties share rank 2.5


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_scikit_learn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    labels, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert accuracy(predictions, labels) == pytest.approx(sk.accuracy_score(labels, predictions))
    assert matthews(predictions, labels) == pytest.approx(sk.matthews_corrcoef(labels, predictions))
    binary_labels, binary_predictions = labels % 2, predictions % 2
    assert f1(binary_predictions, binary_labels) == pytest.approx(
        sk.f1_score(binary_labels, binary_predictions)
    )
    x, y = rng.normal(size=100), rng.integers(0, 5, 100).astype(float)  # many ties in y
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_score_uses_argmax_for_classes_and_the_single_output_for_regression():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert score(("accuracy",), logits, [1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}
    values = np.array([[1.0], [2.0], [3.5]])
    assert score(("pearson",), values, [1.0, 2.0, 3.0], "mismatched_")["mismatched_pearson"] > 0.99


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def test_glue_formats_mnli_labels_and_headerless_cola(tmp_path):
    mnli = tmp_path / "mnli"
    header = "index\tsentence1\tsentence2\tgold_label\n"
    _write(mnli, "train.tsv", header + "0\tA man\tA person\tentailment\n1\tA dog\tA cat\tcontradiction\n")
    _write(mnli, "dev_matched.tsv", header + "0\tx\ty\tneutral\n")
    _write(mnli, "dev_mismatched.tsv", header + "0\tx\ty\tcontradiction\n")
    data = load_task_data(get_task("mnli"), data=mnli)
    assert data.train.labels == [0, 2] and data.train.pairs == ["A person", "A cat"]
    assert data.evals[""].labels == [1] and data.evals["mismatched_"].labels == [2]
    cola = tmp_path / "cola"
    _write(cola, "train.tsv", "gj04\t1\t\tThe sailors rode the breeze .\ngj04\t0\t*\tThe more we study .\n")
    _write(cola, "dev.tsv", "gj04\t1\t\tHe left .\n")
    data = load_task_data(get_task("cola"), data=cola, max_train_samples=1)
    assert data.train.texts == ["The sailors rode the breeze ."] and data.train.labels == [1]


def test_stsb_labels_are_floats_and_quotes_are_text(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = '0\tmain\tf\t2012\t1\tnone\tnone\tA "quoted\tB\t3.8\n'
    _write(tmp_path, "train.tsv", header + row)
    _write(tmp_path, "dev.tsv", header + row)
    data = load_task_data(get_task("stsb"), data=tmp_path)
    assert data.train.labels == [3.8] and data.train.texts == ['A "quoted']
    assert data.task.num_labels == 1


def test_csv_integer_labels_and_files_instead_of_a_directory(tmp_path):
    _write(tmp_path, "a.csv", 'text,other,y\n"hello, world",q,2\nbye,r,0\n')
    _write(tmp_path, "b.csv", "text,other,y\nhi,s,1\n")
    task = get_task("csv", text_column="text", pair_column="other", label_column="y")
    data = load_task_data(task, train_file=tmp_path / "a.csv", eval_file=tmp_path / "b.csv")
    assert data.task.labels == ("0", "1", "2")
    assert data.train.texts == ["hello, world", "bye"] and data.train.pairs == ["q", "r"]
    assert data.evals[""].labels == [1]


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"train.jsonl": '{"t": "a", "l": 1}\n[1, 2]\n', "dev.jsonl": '{"t": "b", "l": 0}\n'},
            "line 2 is not a JSON object",
        ),
        ({"train.csv": "t,l\na,1\n", "dev.csv": "t,l\nb,0\n"}, "a classifier needs at least two"),
        ({"train.csv": "t,l\na,1\nb,-1\n", "dev.csv": "t,l\nb,0\n"}, "is negative"),
        ({"train.csv": "t,x\na,1\n", "dev.csv": "t,l\nb,0\n"}, "has no column 'l' (its columns: t, x)"),
    ],
)
def test_bad_csv_files(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path, name, text)
    with pytest.raises(UserError, match=None) as error:
        load_task_data(get_task("csv", text_column="t", label_column="l"), data=tmp_path)
    assert message in str(error.value)


def test_without_data_the_hub_path_explains_what_to_do(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match="pass --data DIR"):
        load_task_data(get_task("rte"))


def test_every_reader_takes_tsv_fields_verbatim_and_csv_fields_quoted(tmp_path):
    """One quoting rule: a TSV field's quotes are text; a CSV field may be quoted (a comma inside it)."""
    from pathlib import Path

    from mlp_fusion.batches import read_probe_texts
    from mlp_fusion.training.data2text import read_text2text

    tsv = tmp_path / "rows.tsv"
    tsv.write_text('text\ttarget\n"quoted" start\tone "two"\n')
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text('text,target\n"a, b",c\n')
    assert read_probe_texts(tsv) == ['"quoted" start']
    assert read_probe_texts(csv_file) == ["a, b"]
    items = read_text2text(Path(tsv), "text", "target")
    assert (items[0].source, items[0].references) == ('"quoted" start', ['one "two"'])
    items = read_text2text(Path(csv_file), "text", "target")
    assert (items[0].source, items[0].references) == ("a, b", ["c"])

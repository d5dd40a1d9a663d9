"""Data-to-text readers (on the real WebNLG and E2E files), prompt formatting, and generation metrics."""

import json
from pathlib import Path

import pytest
import sacrebleu
from tiny_models import save_tokenizer

from mlp_fusion.errors import UserError
from mlp_fusion.training.data2text import (
    format_example,
    read_dart,
    read_e2e,
    read_text2text,
    read_webnlg,
)
from mlp_fusion.training.text_metrics import generation_scores, rouge_l

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEBNLG, E2E = DATA / "webnlg2017", DATA / "e2e"
needs_shared_data = pytest.mark.skipif(
    not (WEBNLG.is_dir() and E2E.is_dir()),
    reason=f"the shared WebNLG and E2E files are not at {DATA} (a clone without ../shared/data)",
)


@needs_shared_data
def test_webnlg_flat_and_official_dev_agree_on_inputs_and_reference_counts():
    flat = read_webnlg(WEBNLG / "enriched_v1.6_flat" / "dev.jsonl")
    official = read_webnlg(WEBNLG / "official_challenge2017_dev.json")
    assert len(official) == 872 and sum(len(i.references) for i in official) == 2268  # the README's counts
    assert len(flat) == 870  # two entries of the enriched corpus have only empty texts: no test item
    assert {i.source for i in flat} <= {i.source for i in official}
    assert flat[0].source == official[0].source == "Aarhus : leaderName : Jacob Bundsgaard"
    assert official[0].references == ["The leader of Aarhus is Jacob Bundsgaard."]


@needs_shared_data
def test_webnlg_test_split_marks_unseen_categories():
    items = read_webnlg(WEBNLG / "enriched_v1.6_flat" / "test.jsonl")
    assert len(items) == 1862
    unseen = {i.category for i in items if not i.seen}
    assert len(unseen) == 5 and len({i.category for i in items if i.seen}) == 10


@needs_shared_data
def test_e2e_groups_references_by_meaning_representation():
    items = read_e2e(E2E / "devset.csv")
    assert len(items) == 547 and sum(len(i.references) for i in items) == 4672
    assert items[0].source == "name : Alimentum | area : city centre | familyFriendly : no"


def test_dart_and_text2text(tmp_path):
    dart = tmp_path / "dart.json"
    entry = {
        "tripleset": [["Mars_Hill", "LOCATION", "Maine"]],
        "annotations": [{"source": "x", "text": "Mars Hill is in Maine."}],
    }
    dart.write_text(json.dumps([entry, entry | {"tripleset": [["A", "B", "C"]]}]))
    items = read_dart(dart)
    assert [i.source for i in items] == ["Mars Hill : LOCATION : Maine", "A : B : C"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"q": "in", "a": "out 1"}\n{"q": "in", "a": "out 2"}\n{"q": "other", "a": "x"}\n')
    items = read_text2text(pairs, "q", "a")
    assert [(i.source, i.references) for i in items] == [("in", ["out 1", "out 2"]), ("other", ["x"])]


@pytest.mark.parametrize(
    "name, content, reader, message",
    [
        (
            "bad.jsonl",
            '{"modifiedtripleset": ["a | b | c"], "lex": [{"text": "t"}]}\nnot json\n',
            read_webnlg,
            "line 2",
        ),
        (
            "bad.jsonl",
            '{"modifiedtripleset": ["a | b"], "lex": [{"text": "t"}]}\n',
            read_webnlg,
            "subject, a property",
        ),
        ("bad.json", '{"entries": 3}', read_webnlg, "not WebNLG challenge JSON"),
        ("bad.csv", "meaning,ref\nx,y\n", read_e2e, "no column 'mr'"),
        ("bad.csv", "mr,ref\nnot a slot list,y\n", read_e2e, "is not 'slot[value], ...'"),
        ("bad.json", '{"tripleset": []}', read_dart, "not DART JSON"),
        ("empty.csv", "mr,ref\n", read_e2e, "has no examples"),
    ],
)
def test_readers_reject_malformed_files_naming_them(tmp_path, name, content, reader, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as error:
        reader(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path):
    import transformers

    save_tokenizer(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, bos_token="[CLS]", eos_token="[SEP]")
    example = format_example(tokenizer, "film : is : good", "a good film", max_length=32)
    target = tokenizer(" a good film", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_length = len(example["input_ids"]) - len(target)
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:] == target
    assert example["input_ids"][0] == tokenizer.bos_token_id
    short = format_example(tokenizer, "film : is : good " * 20, "a good film", max_length=16)
    assert len(short["input_ids"]) == 16 and short["labels"][-len(target) :] == target  # the prompt is cut
    assert "labels" not in format_example(tokenizer, "film : is : good", None, max_length=32)


def test_multi_reference_scores_match_sacrebleu_and_ignore_missing_references():
    hypotheses = ["the cat sat on the mat", "a dog barks loudly", "it rains"]
    references = [
        ["the cat sat on a mat", "a cat is on the mat"],
        ["a dog barks", "the dog is loud"],
        ["it is raining", "rain"],
    ]
    scores = generation_scores(hypotheses, references)
    streams = [[r[0] for r in references], [r[1] for r in references]]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, streams).score)
    assert scores["ter"] == pytest.approx(sacrebleu.corpus_ter(hypotheses, streams).score)
    # inputs with fewer references: a missing one must not count (as an empty string would); repeating a
    # reference changes no metric, so sacrebleu with the first reference repeated is the expected value
    ragged = generation_scores(hypotheses, [references[0], references[1][:1], references[2][:1]])
    repeated = [[r[0] for r in references], [references[0][1], references[1][0], references[2][0]]]
    assert ragged["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, repeated).score)
    assert ragged["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, repeated).score)
    assert ragged["ter"] == pytest.approx(sacrebleu.corpus_ter(hypotheses, repeated).score)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat down") = 3: precision 1, recall 3/4, F(beta 1.2) = 2.44 * 0.75 / (0.75 + 1.44)
    assert rouge_l("the cat sat", ["nothing alike", "The cat sat down"]) == pytest.approx(2.44 * 0.75 / 2.19)
    assert rouge_l("x", ["y"]) == 0.0

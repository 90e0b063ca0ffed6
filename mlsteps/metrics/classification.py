"""Accuracy, macro-F1, exact match and token-F1. Pure Python: no torch, no numpy.

Answer normalisation (exact match / token-F1), SQuAD v1.1 style with a CJK extension:

1. lowercase;
2. delete punctuation: every ASCII ``string.punctuation`` character (as SQuAD does) and every
   Unicode punctuation character (category ``P*``, e.g. ``。，「」``);
3. remove the English articles ``a``, ``an``, ``the`` as whole words;
4. tokens: whitespace-separated words, except that every CJK character (Han, Hiragana,
   Katakana) is its own token, so ``"北京 大学"`` and ``"北京大学"`` are the same answer
   (MLQA's mixed segmentation).

Exact match is 1 when the token sequences are equal; token-F1 is the harmonic mean of token
precision and recall (bag of tokens). With several references an example takes its best
reference. Scores are fractions in [0, 1], averaged over examples.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mlsteps.errors import HERE, UserError

NORMALISATION = (
    "SQuAD-style: lowercase, strip ASCII+Unicode punctuation, drop articles a/an/the, "
    "whitespace tokens with one token per CJK character; best reference per example; mean in [0,1]"
)

# Han (incl. extensions and compatibility ideographs), Hiragana, Katakana: scripts written
# without spaces, so a "word" is not defined by whitespace; one character = one token.
CJK_CHARS = "\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_CJK_RE = re.compile(f"([{CJK_CHARS}])")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(char: str) -> bool:
    return char in _ASCII_PUNCT or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Apply the documented normalisation; tokens joined by single spaces."""
    return " ".join(answer_tokens(text))


def answer_tokens(text: str) -> list[str]:
    """Tokens of ``text`` after normalisation (see the module docstring)."""
    lowered = text.lower()
    # Deleted, not replaced by a space, exactly as the SQuAD script does ("don't" -> "dont").
    no_punct = "".join(ch for ch in lowered if not _is_punct(ch))
    no_articles = _ARTICLES_RE.sub(" ", no_punct)
    spaced = _CJK_RE.sub(r" \1 ", no_articles)
    return spaced.split()


def as_reference_lists(
    references: Sequence[str | Sequence[str]], *, name: str = "references"
) -> list[list[str]]:
    """Turn a column of references (each a string or a list of strings) into lists of strings.

    Raises UserError for an empty column, a row without any reference, or values that are
    neither strings nor lists of strings (e.g. numbers or lists of lists).
    """
    if len(references) == 0:
        raise UserError(f"no {name} given", field=HERE, hint="the data has no rows")
    out: list[list[str]] = []
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            refs = [ref]
        elif isinstance(ref, list | tuple) and all(isinstance(r, str) for r in ref):
            refs = list(ref)
        else:
            raise UserError(
                f"{name} row {i} is {type(ref).__name__} {str(ref)[:60]!r}, expected a string or "
                "a list of strings",
                field=HERE,
                hint="point reference_column at a text column",
            )
        refs = [r for r in refs if r.strip()]
        if not refs:
            raise UserError(
                f"{name} row {i} is empty", field=HERE, hint="drop rows without a reference"
            )
        out.append(refs)
    return out


def check_pairs(n_predictions: int, n_references: int) -> None:
    """Predictions and references must be non-empty and of equal count."""
    if n_predictions == 0 or n_references == 0:
        raise UserError(
            f"cannot score {n_predictions} predictions against {n_references} references",
            field=HERE,
            hint="give at least one row",
        )
    if n_predictions != n_references:
        raise UserError(
            f"{n_predictions} predictions but {n_references} references",
            field=HERE,
            hint="every prediction needs exactly one reference row",
        )


def _labels(values: Sequence[Any], *, name: str) -> list[str]:
    out = []
    for i, value in enumerate(values):
        if isinstance(value, list | tuple | dict):
            raise UserError(
                f"{name} row {i} is a {type(value).__name__}, expected a single label",
                field=HERE,
                hint="point label_column at a column of scalar labels",
            )
        # Labels compare as strings so that 1 and "1" (int vs text columns) are the same class.
        out.append(str(value))
    return out


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of predictions equal to the gold label (labels compared as strings)."""
    check_pairs(len(predictions), len(labels))
    pred = _labels(predictions, name="prediction")
    gold = _labels(labels, name="label")
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over every class seen in gold or predictions.

    A class with no true positives scores 0 (same as scikit-learn's ``zero_division=0``).
    """
    check_pairs(len(predictions), len(labels))
    pred = _labels(predictions, name="prediction")
    gold = _labels(labels, name="label")
    classes = sorted(set(pred) | set(gold))
    total = 0.0
    for cls in classes:
        tp = sum(p == cls and g == cls for p, g in zip(pred, gold, strict=True))
        fp = sum(p == cls and g != cls for p, g in zip(pred, gold, strict=True))
        fn = sum(p != cls and g == cls for p, g in zip(pred, gold, strict=True))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)


def _token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD v2 convention: both empty is a match, one empty is not.
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of max over references of normalised equality (see module doc)."""
    check_pairs(len(predictions), len(references))
    refs = as_reference_lists(references)
    hits = 0
    for pred, ref_list in zip(predictions, refs, strict=True):
        tokens = answer_tokens(pred)
        hits += any(tokens == answer_tokens(r) for r in ref_list)
    return hits / len(refs)


def token_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of max over references of SQuAD token-F1 (see module doc)."""
    check_pairs(len(predictions), len(references))
    refs = as_reference_lists(references)
    total = 0.0
    for pred, ref_list in zip(predictions, refs, strict=True):
        tokens = answer_tokens(pred)
        total += max(_token_f1(tokens, answer_tokens(r)) for r in ref_list)
    return total / len(refs)

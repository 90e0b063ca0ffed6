"""Scores of generated text and predicted labels against references: the compute functions the
metric table (metrics/table.py) names for its generation and label metrics, and the one dispatch
shared by the eval stage and ``mlsteps score`` (so that both report the same numbers, signatures
and conventions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlsteps.metrics.table import TABLE, compute_function

TEXT_METRICS = tuple(m.name for m in TABLE if m.family == "generation")
LABEL_METRICS = tuple(m.name for m in TABLE if m.family == "labels")
F1_CONVENTION = "macro-F1 over classes seen in gold or predictions; labels compared as text"

Refs = Sequence[str | Sequence[str]]


def bleu_scores(preds: Sequence[str], refs: Refs, *, target_lang: str | None) -> dict[str, Any]:
    from mlsteps.metrics import text

    return text.bleu(preds, refs, target_lang=target_lang)


def chrf_scores(preds: Sequence[str], refs: Refs, *, target_lang: str | None) -> dict[str, Any]:
    from mlsteps.metrics import text

    return text.chrf(preds, refs)  # character n-grams: no language tokenisation


def ter_scores(preds: Sequence[str], refs: Refs, *, target_lang: str | None) -> dict[str, Any]:
    from mlsteps.metrics import text

    return text.ter(preds, refs, target_lang=target_lang)


def rouge_scores(preds: Sequence[str], refs: Refs, *, target_lang: str | None) -> dict[str, Any]:
    from mlsteps.metrics import text

    return text.rouge(preds, refs, target_lang=target_lang)


def exact_match_scores(
    preds: Sequence[str], refs: Refs, *, target_lang: str | None
) -> dict[str, Any]:
    from mlsteps.metrics import classification

    return {
        "exact_match": classification.exact_match(preds, refs),
        "exact_match_convention": classification.NORMALISATION,
    }


def token_f1_scores(preds: Sequence[str], refs: Refs, *, target_lang: str | None) -> dict[str, Any]:
    from mlsteps.metrics import classification

    return {
        "token_f1": classification.token_f1(preds, refs),
        "token_f1_convention": classification.NORMALISATION,
    }


def accuracy_scores(predicted: Sequence[Any], gold: Sequence[Any]) -> dict[str, Any]:
    from mlsteps.metrics import classification

    return {"accuracy": classification.accuracy(predicted, gold)}


def f1_scores(predicted: Sequence[Any], gold: Sequence[Any]) -> dict[str, Any]:
    from mlsteps.metrics import classification

    return {
        "f1": classification.macro_f1(predicted, gold),
        "f1_convention": F1_CONVENTION,
    }


def score_texts(
    predictions: Sequence[str],
    references: Refs,
    metrics: Sequence[str],
    *,
    target_lang: str | None,
) -> dict[str, Any]:
    """``metrics`` (names from TEXT_METRICS) of ``predictions``; references per row are a string
    or a list of strings. Mismatched counts and empty inputs raise UserError."""
    out: dict[str, Any] = {}
    for metric in metrics:
        if metric not in TEXT_METRICS:
            raise ValueError(f"not a text metric: {metric}")
        compute = compute_function(metric)
        out.update(compute(predictions, references, target_lang=target_lang))
    return out


def score_labels(
    predicted: Sequence[Any], gold: Sequence[Any], metrics: Sequence[str]
) -> dict[str, Any]:
    """``metrics`` (names from LABEL_METRICS) of predicted labels against gold labels."""
    out: dict[str, Any] = {}
    for metric in metrics:
        if metric not in LABEL_METRICS:
            raise ValueError(f"not a label metric: {metric}")
        out.update(compute_function(metric)(predicted, gold))
    return out

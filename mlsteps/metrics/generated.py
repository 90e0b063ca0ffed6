"""Scores of generated text against references: the one dispatch shared by the eval stage and
``mlsteps score`` (so that both report the same numbers, signatures and conventions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEXT_METRICS = ("bleu", "chrf", "ter", "rouge", "exact_match", "token_f1")


def score_texts(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str],
    *,
    target_lang: str | None,
    where: str,
) -> dict[str, Any]:
    """``metrics`` (names from TEXT_METRICS) of ``predictions``; references per row are a string
    or a list of strings. Mismatched counts and empty inputs raise UserError."""
    from mlsteps.metrics import classification, text

    out: dict[str, Any] = {}
    for metric in metrics:
        if metric == "bleu":
            out.update(text.bleu(predictions, references, target_lang=target_lang, where=where))
        elif metric == "chrf":
            out.update(text.chrf(predictions, references, where=where))
        elif metric == "ter":
            out.update(text.ter(predictions, references, target_lang=target_lang, where=where))
        elif metric == "rouge":
            out.update(text.rouge(predictions, references, target_lang=target_lang, where=where))
        elif metric == "exact_match":
            out["exact_match"] = classification.exact_match(predictions, references, where=where)
            out["exact_match_convention"] = classification.NORMALISATION
        elif metric == "token_f1":
            out["token_f1"] = classification.token_f1(predictions, references, where=where)
            out["token_f1_convention"] = classification.NORMALISATION
        else:
            raise ValueError(f"not a text metric: {metric}")
    return out

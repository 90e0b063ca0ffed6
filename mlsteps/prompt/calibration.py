"""Calibrated rank classification with a prompted model (contextual calibration, domain PMI).

Raw verbalizer scores mostly measure how likely each label *word* is after the template, so a
weak model predicts one class for every row; the calibrations here subtract a per-label prior
(docs/quickstart.md, "Prompting for classification").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlsteps.prompt.prompter import Prompter
from mlsteps.prompt.scoring import argmax_labels, label_logprobs

if TYPE_CHECKING:
    from torch.nn import Module
    from transformers import PreTrainedTokenizerBase


def _log_normalize(row: Sequence[float]) -> list[float]:
    """log of the distribution over labels (softmax of the row), in float64."""
    peak = max(row)
    log_z = peak + math.log(sum(math.exp(x - peak) for x in row))
    return [x - log_z for x in row]


def _verbalizer(prompter: Prompter) -> dict[str, str]:
    # The prompt spec requires a verbalizer for classification; generation prompters have none.
    if prompter.verbalizer is None:
        raise ValueError("rank classification needs a prompter with a verbalizer")
    return prompter.verbalizer


def calibration_offsets(
    model: Module, tokenizer: PreTrainedTokenizerBase, prompter: Prompter, *, batch_size: int = 16
) -> list[float] | None:
    """Per-label log offsets subtracted from every row's label scores (None: no calibration).

    - ``contextual`` (Zhao et al. 2021): p_cf = the mean, over the content-free inputs
      ("N/A", "", "[MASK]") put into the full prompt (demonstrations included), of the label
      distribution renormalised over the verbalizer words; the decision is argmax p(y|x) / p_cf(y),
      i.e. log p(y|x) - log p_cf(y). This removes the prompt's prior towards one label word
      (majority-label and recency bias of the demonstrations, a word's frequency).
    - ``domain_pmi`` (Holtzman et al. 2021): log p(y|x) - log p(y|premise), the premise being the
      template's text after its last field (see ``Prompter.domain_premise``).
    """
    mode = getattr(prompter, "calibration", "none")
    if mode in (None, "none"):
        return None
    verbalizer = _verbalizer(prompter)
    prefix = prompter.answer_prefix
    if mode == "contextual":
        prompts = [prompter.render(row) for row in prompter.content_free_rows()]
        rows = label_logprobs(
            model, tokenizer, prompts, verbalizer, answer_prefix=prefix, batch_size=batch_size
        )
        probs = [[math.exp(x) for x in _log_normalize(row)] for row in rows]
        mean = [sum(col) / len(probs) for col in zip(*probs, strict=True)]
        return [math.log(max(p, 1e-300)) for p in mean]
    if mode == "domain_pmi":
        (row,) = label_logprobs(
            model,
            tokenizer,
            [prompter.domain_premise()],
            verbalizer,
            answer_prefix=prefix,
            batch_size=batch_size,
        )
        return list(row)
    raise ValueError(f"unknown calibration {mode!r}")


def prompted_label_scores(
    model: Module,
    tokenizer: PreTrainedTokenizerBase,
    prompter: Prompter,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[list[float]]:
    """Uncalibrated log p(label word | prompt) for every prompt (rows) and verbalizer label
    (columns). They depend on the weights, the tokenizer, the prompts and the verbalizer only, not
    on the calibration, so the eval stage reuses them across calibrations of one model."""
    return label_logprobs(
        model,
        tokenizer,
        prompts,
        _verbalizer(prompter),
        answer_prefix=prompter.answer_prefix,
        batch_size=batch_size,
    )


def calibrated_labels(
    model: Module,
    tokenizer: PreTrainedTokenizerBase,
    prompter: Prompter,
    rows: Sequence[Sequence[float]],
    *,
    batch_size: int = 16,
) -> list[str]:
    """The arg-max label of each row of :func:`prompted_label_scores`, after subtracting the
    offsets of ``prompter.calibration`` (see :func:`calibration_offsets`)."""
    verbalizer = _verbalizer(prompter)
    offsets = calibration_offsets(model, tokenizer, prompter, batch_size=batch_size)
    if offsets is not None:
        rows = [[x - o for x, o in zip(row, offsets, strict=True)] for row in rows]
    return argmax_labels(list(verbalizer), rows)


def classify_prompted(
    model: Module,
    tokenizer: PreTrainedTokenizerBase,
    prompter: Prompter,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[str]:
    """Rank classification of rendered ``prompts`` with the prompter's verbalizer, calibrated as
    ``prompter.calibration`` says (see :func:`calibration_offsets`)."""
    rows = prompted_label_scores(model, tokenizer, prompter, prompts, batch_size=batch_size)
    return calibrated_labels(model, tokenizer, prompter, rows, batch_size=batch_size)

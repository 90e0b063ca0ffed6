"""The metric table: every metric an eval stage (or ``mlsteps score``) can compute, declared once.

Each :class:`Metric` says which model kinds it fits, the option family that decides which columns
and option blocks of the eval recipe it reads, the ladder columns it writes (each with its better
direction and its scale) and where its compute function lives (a ``module:function`` path,
imported only when scoring, so that ``validate`` and ``--help`` stay torch-free). The recipe
validation (recipe/specs/evaluate.py), the eval stage's dispatch, ``mlsteps score`` and the report's
best-value marks and 0-100 ladder scale are all read from here.

lm-eval results (engine/harness.py) are not in the table: they keep lm-eval's own
``<task>/<metric>,<filter>`` names, directions and scales, and the report leaves them unmarked.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Literal

Direction = Literal["max", "min"]
# 0-1: a fraction, shown x100 in ladders; 0-100: sacrebleu's scale; perplexity: exp(nats/token);
# bits: bits per UTF-8 byte; count: how many items were scored (no better direction).
Scale = Literal["0-1", "0-100", "perplexity", "bits", "count"]


@dataclass(frozen=True)
class Column:
    """One number a metric writes into a ladder row (metrics.json keeps it on ``scale``)."""

    key: str
    better: Direction | None
    scale: Scale


@dataclass(frozen=True)
class Metric:
    """One eval metric: its recipe name, what it fits and reads, what it writes, its code."""

    name: str
    family: str  # the option family: see FAMILIES
    kinds: frozenset[str]  # model kinds it scores (a prompted verbalizer model also gets labels)
    columns: tuple[Column, ...]
    compute: str  # "module:function", imported lazily by :func:`compute_function`
    language: bool = False  # its tokenisation follows target_lang


# Option families: which data columns and option blocks a metric reads (recipe/specs/evaluate.py).
FAMILIES = ("perplexity", "response", "masked", "generation", "labels", "preference")

_CAUSAL = frozenset({"clm"})
_GENERATIVE = frozenset({"clm", "seq2seq"})


def _ppl(prefix: str) -> tuple[Column, ...]:
    return (
        Column(f"{prefix}perplexity", "min", "perplexity"),
        Column(f"{prefix}bits_per_byte", "min", "bits"),
        Column(f"{prefix}word_perplexity", "min", "perplexity"),
        Column(f"{prefix}perplexity_tokens", None, "count"),
    )


def _text(name: str, better: Direction, scale: Scale, *, language: bool = False) -> Metric:
    return Metric(
        name,
        "generation",
        _GENERATIVE,
        (Column(name, better, scale),),
        f"mlsteps.metrics.generated:{name}_scores",
        language,
    )


TABLE: tuple[Metric, ...] = (
    Metric(
        "perplexity",
        "perplexity",
        _CAUSAL,
        _ppl(""),
        "mlsteps.metrics.perplexity:causal_lm_perplexity",
    ),
    Metric(
        "response_perplexity",
        "response",
        _GENERATIVE,
        _ppl("response_"),
        "mlsteps.metrics.response_perplexity:sharded_response_perplexity",
    ),
    Metric(
        "masked_perplexity",
        "masked",
        frozenset({"mlm"}),
        (Column("masked_perplexity", "min", "perplexity"),),
        "mlsteps.metrics.perplexity:masked_lm_perplexity",
    ),
    Metric(
        "pseudo_perplexity",
        "masked",
        frozenset({"mlm"}),
        (Column("pseudo_perplexity", "min", "perplexity"),),
        "mlsteps.metrics.perplexity:pseudo_perplexity",
    ),
    _text("bleu", "max", "0-100", language=True),
    Metric(
        "chrf",
        "generation",
        _GENERATIVE,
        (Column("chrf", "max", "0-100"),),
        "mlsteps.metrics.generated:chrf_scores",
    ),
    _text("ter", "min", "0-100", language=True),
    Metric(
        "rouge",
        "generation",
        _GENERATIVE,
        tuple(Column(k, "max", "0-1") for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")),
        "mlsteps.metrics.generated:rouge_scores",
        language=True,
    ),
    Metric(
        "accuracy",
        "labels",
        frozenset({"classification"}),
        (Column("accuracy", "max", "0-1"),),
        "mlsteps.metrics.generated:accuracy_scores",
    ),
    Metric(
        "f1",
        "labels",
        frozenset({"classification"}),
        (Column("f1", "max", "0-1"),),
        "mlsteps.metrics.generated:f1_scores",
    ),
    _text("exact_match", "max", "0-1"),
    _text("token_f1", "max", "0-1"),
    Metric(
        "preference_accuracy",
        "preference",
        _CAUSAL,
        (
            Column("preference_accuracy", "max", "0-1"),
            Column("preference_accuracy_normalized", "max", "0-1"),
            Column("preference_pairs", None, "count"),
        ),
        "mlsteps.metrics.preference:ladder_scores",
    ),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)

# Columns written by stages other than eval (the fine-tune stage's classification validation).
OTHER_COLUMNS: tuple[Column, ...] = (Column("macro_f1", "max", "0-1"),)
COLUMNS: dict[str, Column] = {c.key: c for m in TABLE for c in m.columns} | {
    c.key: c for c in OTHER_COLUMNS
}


def family(name: str) -> frozenset[str]:
    """The metric names of one option family."""
    return frozenset(m.name for m in TABLE if m.family == name)


def fitting(kind: str) -> frozenset[str]:
    """The metric names that can score a model of ``kind`` (clm, seq2seq, mlm, classification)."""
    return frozenset(m.name for m in TABLE if kind in m.kinds)


def better(column: str) -> Direction | None:
    """Which way a ladder column improves; None for counts, notes and lm-eval's own columns."""
    col = COLUMNS.get(column)
    return col.better if col is not None else None


def percent_scaled(column: str) -> bool:
    """A column stored on 0-1 that ladders show x100, next to sacrebleu's 0-100 scores."""
    col = COLUMNS.get(column)
    return col is not None and col.scale == "0-1"


def compute_function(name: str) -> Any:
    """The compute function of metric ``name``, imported now (heavy imports happen here)."""
    module, _, function = BY_NAME[name].compute.partition(":")
    return getattr(import_module(module), function)

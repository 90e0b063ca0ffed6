"""The stage ladder: an eval stage's {model: {metric: value}} as a table (one row per model, the
metric table's 0-100 scale, the best value per directed column), its conventions and legends;
and the number formatting every report table uses.
"""

from __future__ import annotations

import json
import math
from typing import Any, cast

from mlsteps.metrics import table
from mlsteps.report.text import LADDER_SCALE_NOTE, PERCENT_SCALED, ladder_value

# Keys that describe a number rather than being one; shown under the table, not as columns.
LM_EVAL_NOTE = (
    "lm-eval columns (<task>/<metric>,<filter>) are lm-eval's numbers on its own scale "
    "(accuracy 0-1), as in its results files"
)


_CONVENTION_SUFFIXES = ("_convention", "_signature", "_note", "_tokenizer")


# ``key_error`` explains why ``key`` is null (a non-finite value); shown in key's cell.
_ERROR_SUFFIX = "_error"


# Direction of each ladder metric, to mark the best model per column (the metric table's).
HIGHER_IS_BETTER = frozenset(k for k, c in table.COLUMNS.items() if c.better == "max")


LOWER_IS_BETTER = frozenset(k for k, c in table.COLUMNS.items() if c.better == "min")


# What each perplexity column of a ladder means, said once under the table.
PERPLEXITY_LEGEND = {
    "perplexity": "of the text column as bare text (no prompt)",
    "response_perplexity": "of the reference given each model's own prompt (template, "
    "demonstrations, soft prompt; the encoder input for seq2seq)",
}


def is_convention(key: str) -> bool:
    return key.endswith(_CONVENTION_SUFFIXES)


def is_error_of(key: str, values: dict[str, Any]) -> bool:
    return key.endswith(_ERROR_SUFFIX) and key[: -len(_ERROR_SUFFIX)] in values


def cell(values: dict[str, Any], key: str) -> str:
    """A ladder cell: on the table's 0-100 scale, or why the metric has no number."""
    return fmt(ladder_value(key, values.get(key, "")), values.get(key + _ERROR_SUFFIX))


def fmt(value: Any, error: Any = None) -> str:
    if value is None and error:
        return f"n/a: {error}"  # a non-finite metric, recorded as null with its reason
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.2f}"
    return str(value)


def is_ladder(stage_metrics: Any) -> bool:
    """An eval stage's metrics: {model: {metric: value}} (one row per model)."""
    return (
        isinstance(stage_metrics, dict)
        and bool(stage_metrics)
        and all(isinstance(v, dict) for v in stage_metrics.values())
    )


def _best(stage_metrics: dict[str, Any], column: str) -> float | None:
    values = [
        v.get(column)
        for v in stage_metrics.values()
        if isinstance(v.get(column), int | float) and not isinstance(v.get(column), bool)
    ]
    values = [v for v in values if math.isfinite(v)]
    if len(set(values)) < 2 or column not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
        return None  # nothing to compare, or every model ties
    best = max(values) if column in HIGHER_IS_BETTER else min(values)
    return cast(float | None, best)


def ladder_rows(
    stage_metrics: dict[str, Any], *, hide: frozenset[str] = frozenset()
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and convention notes of a stage-ladder table (``hide``: columns left out).

    A convention shared by every model is noted once, without a model name.
    """
    columns: list[str] = []
    conventions: dict[str, dict[str, Any]] = {}
    for model, values in stage_metrics.items():
        for key, value in values.items():
            if is_convention(key):
                conventions.setdefault(key, {})[model] = value
            elif is_error_of(key, values):
                continue
            elif key not in columns and key not in hide:
                columns.append(key)
    notes: list[str] = []
    for key, per_model in conventions.items():
        distinct = {json.dumps(v, default=str) for v in per_model.values()}
        if len(distinct) == 1 and len(per_model) == len(stage_metrics):
            notes.append(f"{key} = {next(iter(per_model.values()))}")
        else:
            notes += [f"{model}: {key} = {value}" for model, value in per_model.items()]
    if PERCENT_SCALED & set(columns):
        notes.insert(0, LADDER_SCALE_NOTE)
    if any("/" in c and "," in c for c in columns):  # engine.harness: <task>/<metric>,<filter>
        notes.insert(0, LM_EVAL_NOTE)
    rows = [[model, *(cell(values, c) for c in columns)] for model, values in stage_metrics.items()]
    return ["model", *columns], rows, notes


def best_cells(stage_metrics: dict[str, Any], header: list[str]) -> set[tuple[int, int]]:
    """(row, column) positions of the best value of each directed metric column."""
    marked: set[tuple[int, int]] = set()
    for col, name in enumerate(header[1:], start=1):
        best = _best(stage_metrics, name)
        if best is None:
            continue
        for row, values in enumerate(stage_metrics.values()):
            if values.get(name) == best:
                marked.add((row, col))
    return marked


def md_table(header: list[str], rows: list[list[str]], bold: set[tuple[int, int]] = set()) -> str:  # noqa: B006 - read only
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, row in enumerate(rows):
        cells = [f"**{c}**" if (r, k) in bold else c for k, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ladders(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: m for name, m in metrics.items() if is_ladder(m)}


def perplexity_legend(header: list[str]) -> list[str]:
    """Lines saying what the ladder's perplexity columns measure (none without such columns)."""
    return [f"{column} = {text}" for column, text in PERPLEXITY_LEGEND.items() if column in header]


def ladder_md(name: str, ladder: dict[str, Any]) -> list[str]:
    header, rows, notes = ladder_rows(ladder)
    out = [md_table(header, rows, best_cells(ladder, header)), ""]
    legend = perplexity_legend(header)
    if legend:
        out += [f"Perplexity: {'; '.join(legend)}.", ""]
    if notes:
        out += ["Conventions:", ""] + [f"- `{n}`" for n in notes] + [""]
    return out

"""The preference stage's rows: loaded, columns checked, then turned into TRL's columns and types
(``prompt``/``chosen``/``rejected``; KTO ``prompt``/``completion``/``label``). Conversations are
normalised; pairs of whole conversations without a prompt column are split after their
shared opening turns. Every bad cell is a UserError naming its row.
"""

from __future__ import annotations

from typing import Any

import datasets

from mlsteps.context import StageContext
from mlsteps.engine import chat_data
from mlsteps.engine.data import load_rows, require_columns, split_validation
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.preference import PreferenceSpec


def load_rows_and_validation(
    spec: PreferenceSpec, ctx: StageContext
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    with field_scope("data"):
        rows = load_rows(spec.data, cache_dir=ctx.cache_dir)
        require_columns(rows, _columns(spec, rows))
    if spec.validation is not None:
        with field_scope("validation"):
            val = load_rows(spec.validation, cache_dir=ctx.cache_dir)
            require_columns(val, _columns(spec, val))
        return rows, val
    with field_scope("validation_fraction"):
        return split_validation(rows, spec.validation_fraction, ctx.seed)


def _columns(spec: PreferenceSpec, rows: datasets.Dataset) -> list[str]:
    if spec.method == "kto":
        return [spec.prompt_column, spec.completion_column, spec.label_column]
    pair = [spec.chosen_column, spec.rejected_column]
    if _implicit_prompt(spec, rows):
        return pair  # whole conversations: the prompt is their shared turns
    return [spec.prompt_column, *pair]


def _implicit_prompt(spec: PreferenceSpec, rows: datasets.Dataset) -> bool:
    """Pairs of whole conversations without a prompt column (trl-lib/ultrafeedback_binarized)."""
    return (
        spec.method != "kto"
        and spec.prompt_column not in rows.column_names
        and spec.chosen_column in rows.column_names
        and len(rows) > 0
        and chat_data.is_conversation(rows[0][spec.chosen_column])
    )


def to_trl_rows(rows: datasets.Dataset, spec: PreferenceSpec) -> tuple[datasets.Dataset, bool]:
    """Rows in TRL's column names and types; (rows, conversational). UserError names the first
    bad cell. Conversational when the first prompt is a conversation; then every prompt must be."""
    if len(rows) == 0:
        raise UserError("no rows", field=HERE, hint="check the data source and its slices")
    if _implicit_prompt(spec, rows):
        return _split_conversations(rows, spec), True
    kto = spec.method == "kto"
    answer_cols = [spec.completion_column] if kto else [spec.chosen_column, spec.rejected_column]
    trl_answers = ["completion"] if kto else ["chosen", "rejected"]
    conversational = chat_data.is_conversation(rows[0][spec.prompt_column])
    out: dict[str, list[Any]] = {"prompt": [], **{name: [] for name in trl_answers}}
    if kto:
        out["label"] = []
    for i, row in enumerate(rows):
        prompt = row[spec.prompt_column]
        if conversational:
            out["prompt"].append(
                chat_data.normalize_messages(prompt, row=i, column=spec.prompt_column)
            )
        else:
            out["prompt"].append(_text(prompt, spec.prompt_column, i))
        for col, name in zip(answer_cols, trl_answers, strict=True):
            value = row[col]
            if conversational:
                turns = (
                    [{"role": "assistant", "content": _text(value, col, i)}]
                    if isinstance(value, str)
                    else chat_data.normalize_messages(value, row=i, column=col)
                )
                out[name].append(turns)
            else:
                out[name].append(_text(value, col, i))
        if kto:
            out["label"].append(_label(row[spec.label_column], spec.label_column, i))
    return datasets.Dataset.from_dict(out), conversational


def _split_conversations(rows: datasets.Dataset, spec: PreferenceSpec) -> Any:
    out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        good, bad = (
            chat_data.normalize_messages(row[col], row=i, column=col)
            for col in (spec.chosen_column, spec.rejected_column)
        )
        prompt, good, bad = chat_data.split_pair(good, bad)
        if not prompt or not good or not bad:
            raise UserError(
                f"row {i}: columns '{spec.chosen_column}' and '{spec.rejected_column}' share no "
                "opening turns, so there is no prompt to find",
                field=HERE,
                hint=f"give a '{spec.prompt_column}' column, or conversations that differ only "
                "in the final answer",
            )
        out["prompt"].append(prompt)
        out["chosen"].append(good)
        out["rejected"].append(bad)
    return datasets.Dataset.from_dict(out)


def _text(value: Any, column: str, row: int) -> str:
    if not isinstance(value, str) or not value.strip():
        kind = "empty text" if isinstance(value, str) else type(value).__name__
        raise UserError(
            f"column '{column}' row {row} is {kind}, expected text",
            field=HERE,
            hint="every prompt and answer must be non-empty text (or, for the prompt, a "
            "conversation)",
        )
    return value


def _label(value: Any, column: str, row: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(
        f"column '{column}' row {row} is {value!r}, expected true or false",
        field=HERE,
        hint="kto labels say whether the completion is desirable: true or false",
    )

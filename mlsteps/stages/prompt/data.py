"""The prompt stage's rows: training or demonstration rows and the validation sets, loaded and
checked against the template and verbalizer before anything is written.
"""

from __future__ import annotations

from typing import Any

from mlsteps.context import StageContext
from mlsteps.errors import UserError
from mlsteps.prompt.prompter import SOFT_METHODS, Prompter
from mlsteps.recipe.specs.prompt import PromptSpec


def _as_text(value: Any, column: str, index: int, where: str) -> str:
    if isinstance(value, list):
        value = value[0] if value else None  # several references: the first is the target
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"row {index} has an empty '{column}'", where=where)
    return str(value)


def _check_rows(
    rows: list[dict[str, Any]],
    spec: PromptSpec,
    prompter: Prompter,
    where: str,
    *,
    need_target: bool,
) -> None:
    columns = list(rows[0])
    prompter.check_columns(columns, where=f"{where}.template")
    if not need_target:
        return
    if spec.target_column not in columns:
        raise UserError(
            f"target column '{spec.target_column}' not found; the data has: {', '.join(columns)}",
            where=f"{where}.target_column",
        )
    for i, row in enumerate(rows):
        row[spec.target_column] = _as_text(row[spec.target_column], spec.target_column, i, where)
        prompter.label_word(row[spec.target_column])  # every label needs a verbalizer word


def load_data(
    spec: PromptSpec, ctx: StageContext, prompter: Prompter, where: str
) -> tuple[list[dict[str, Any]] | None, dict[str, list[dict[str, Any]]]]:
    """Training/demonstration rows (None without data) and the validation sets by name ('' for
    the unnamed one), checked."""
    if spec.data is None:
        return None, {}
    from mlsteps.engine import validation_sets as vs
    from mlsteps.engine.data import load_rows, split_validation

    soft = spec.method in SOFT_METHODS
    # Nulls are found at load time, by file line (row numbers change with the split below).
    need = [spec.target_column] if spec.method != "zero_shot" else []
    ds = load_rows(spec.data, where=f"{where}.data", cache_dir=ctx.cache_dir, required=need)
    val_ds: dict[str, Any] = {}
    if spec.validation is not None:
        val_ds = vs.map_sets(
            vs.data_sets(spec.validation),
            lambda name, data: load_rows(
                data,
                where=vs.where_of(f"{where}.validation", name),
                cache_dir=ctx.cache_dir,
                required=[spec.target_column] if soft else [],
            ),
        )
    elif soft:
        ds, held_out = split_validation(
            ds, spec.validation_fraction, ctx.seed, where=f"{where}.data"
        )
        val_ds = {"": held_out} if held_out is not None else {}
    rows = [dict(r) for r in ds]
    val_sets = {name: [dict(r) for r in d] for name, d in val_ds.items()}
    need_target = spec.method != "zero_shot"
    _check_rows(rows, spec, prompter, f"{where}.data", need_target=need_target)
    for name, val_rows in val_sets.items():
        if val_rows:
            at = vs.where_of(f"{where}.validation", name)
            _check_rows(val_rows, spec, prompter, at, need_target=soft)
    if spec.method == "few_shot" and spec.shots > len(rows):
        raise UserError(
            f"shots is {spec.shots} but the data has only {len(rows)} rows",
            where=f"{where}.shots",
            hint=f"set shots <= {len(rows)} or give more demonstration rows",
        )
    return rows, val_sets

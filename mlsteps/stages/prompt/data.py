"""The prompt stage's rows: training or demonstration rows and the validation sets, loaded and
checked against the template and verbalizer before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlsteps.context import StageContext
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.prompt.prompter import SOFT_METHODS, Prompter
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.prompt import PromptSpec

if TYPE_CHECKING:
    import datasets


def _as_text(value: Any, column: str, index: int) -> str:
    if isinstance(value, list):
        value = value[0] if value else None  # several references: the first is the target
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"row {index} has an empty '{column}'", field=HERE)
    return str(value)


def _check_rows(
    rows: list[dict[str, Any]],
    spec: PromptSpec,
    prompter: Prompter,
    *,
    need_target: bool,
) -> None:
    """Errors are about the rows' field (the caller scopes it: data, validation.<name>)."""
    columns = list(rows[0])
    prompter.check_columns(columns, field="template")
    if not need_target:
        return
    if spec.target_column not in columns:
        raise UserError(
            f"target column '{spec.target_column}' not found; the data has: {', '.join(columns)}",
            field="target_column",
        )
    for i, row in enumerate(rows):
        row[spec.target_column] = _as_text(row[spec.target_column], spec.target_column, i)
        prompter.label_word(row[spec.target_column])  # every label needs a verbalizer word


def load_data(
    spec: PromptSpec, ctx: StageContext, prompter: Prompter
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
    with field_scope("data"):
        ds = load_rows(spec.data, cache_dir=ctx.cache_dir, required=need)
    val_ds: dict[str, Any] = {}
    if spec.validation is not None:

        def load(name: str, data: DataSpec) -> datasets.Dataset:
            with field_scope(vs.where_of("validation", name)):
                required = [spec.target_column] if soft else []
                return load_rows(data, cache_dir=ctx.cache_dir, required=required)

        val_ds = vs.map_sets(vs.data_sets(spec.validation), load)
    elif soft:
        with field_scope("data"):
            ds, held_out = split_validation(ds, spec.validation_fraction, ctx.seed)
        val_ds = {"": held_out} if held_out is not None else {}
    rows = [dict(r) for r in ds]
    val_sets = {name: [dict(r) for r in d] for name, d in val_ds.items()}
    need_target = spec.method != "zero_shot"
    with field_scope("data"):
        _check_rows(rows, spec, prompter, need_target=need_target)
    for name, val_rows in val_sets.items():
        if val_rows:
            with field_scope(vs.where_of("validation", name)):
                _check_rows(val_rows, spec, prompter, need_target=soft)
    if spec.method == "few_shot" and spec.shots > len(rows):
        raise UserError(
            f"shots is {spec.shots} but the data has only {len(rows)} rows",
            field="shots",
            hint=f"set shots <= {len(rows)} or give more demonstration rows",
        )
    return rows, val_sets

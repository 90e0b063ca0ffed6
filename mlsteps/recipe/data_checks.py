"""The recipe's data, found and checked on disk before any work: every DataSpec inside a stage spec
(for fingerprints and checks), local files and globs that match nothing, builtin sets and splits
that do not exist, an lm_eval include_path that is no directory. Pure Python: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mlsteps.errors import UserError, did_you_mean
from mlsteps.recipe.specs.data import DataSpec

if TYPE_CHECKING:
    from mlsteps.recipe import Recipe


def data_specs(spec: BaseModel) -> list[Any]:
    """Every DataSpec inside a stage spec (for fingerprints and up-front file checks)."""
    found: list[Any] = []
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        if isinstance(value, dict):  # named data sets (validation: {name: data})
            value = [d for v in value.values() for d in _as_list(v)]
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, DataSpec):
                found.append(item)
            elif isinstance(item, BaseModel):
                found.extend(data_specs(item))
    return found


def streamed_keys(spec: BaseModel, prefix: str = "") -> list[str]:
    """Dotted keys (``data.streaming``, ``validation.web.1.streaming``) of streamed DataSpecs."""
    found: list[str] = []
    for name, field in type(spec).model_fields.items():
        value, key = getattr(spec, name), prefix + (field.alias or name)
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, group in items:
            base = f"{key}.{sub}" if sub else key
            listed = _as_list(group)
            for i, item in enumerate(listed):
                at = f"{base}.{i}" if len(listed) > 1 else base
                if isinstance(item, DataSpec):
                    found += [f"{at}.streaming"] if item.streaming else []
                elif isinstance(item, BaseModel):
                    found += streamed_keys(item, f"{at}.")
    return found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def check_data_files(recipe: Recipe) -> None:
    """Fail before any work if a local data file or glob matches nothing, or a builtin set or
    split does not exist (both checks are pure Python: no torch)."""
    import glob

    for stage_name, spec in recipe.stages.items():
        for field_name in type(spec).model_fields:
            value = getattr(spec, field_name)
            # A single source is held as a list of one; its place is named without an index,
            # as it was written. Named sets (validation: {name: data}) are named by their name.
            several = isinstance(value, list) and len(value) > 1
            items = list(enumerate(value)) if several else [(None, v) for v in _as_list(value)]
            if isinstance(value, dict):
                items = [(n, d) for n, v in value.items() for d in _as_list(v)]
            for index, data in items:
                if not isinstance(data, DataSpec):
                    continue
                where = f"stages.{stage_name}.{field_name}" + (
                    f".{index}" if index is not None else ""
                )
                if data.builtin:
                    _check_builtin(data, where)
                for pattern in list(data.files or []) + list((data.aligned or {}).values()):
                    if not glob.glob(str(Path(pattern).expanduser())):
                        raise UserError(
                            f"data file '{pattern}' not found",
                            where=where,
                            hint="check the path (relative paths start at the working directory)",
                        )
        lm_eval = getattr(spec, "lm_eval", None)  # its tasks read their own data
        if lm_eval is not None and lm_eval.include_path is not None:
            if not Path(lm_eval.include_path).expanduser().is_dir():
                raise UserError(
                    f"lm_eval.include_path '{lm_eval.include_path}' is not a directory",
                    where=f"stages.{stage_name}.lm_eval.include_path",
                    hint="point at the directory holding the task YAML files (relative paths "
                    "start at the working directory)",
                )


def _check_builtin(data: DataSpec, where: str) -> None:
    from mlsteps.builtin import list_builtin

    infos = {info.name: info for info in list_builtin()}
    info = infos.get(data.builtin or "")
    if info is None:
        hint = did_you_mean(data.builtin or "", infos) or f"available: {', '.join(infos)}"
        raise UserError(
            f"unknown builtin data set '{data.builtin}'", where=f"{where}.builtin", hint=hint
        )
    if data.split not in info.split_sizes:
        hint = (
            did_you_mean(data.split, info.split_sizes) or f"splits: {', '.join(info.split_sizes)}"
        )
        raise UserError(
            f"builtin '{data.builtin}' has no split '{data.split}'",
            where=f"{where}.split",
            hint=hint,
        )

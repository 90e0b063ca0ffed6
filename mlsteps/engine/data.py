"""DataSpec -> ``datasets.Dataset``: local files, hub data sets, builtin data; row selection
(shuffle_seed, rows, max_samples); nulls by file line; column checks; splits; ``load_text``.

Local files are read by ``data_files`` and checked before ``datasets`` sees them, so that bad
input gives one clear message naming the file. Text files give one row per non-empty line in
column ``text``.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from mlsteps.engine.data_files import load_aligned, read_files
from mlsteps.engine.files import (
    ROW_NUMBER,
    check_header_row,
    check_missing,
    first_missing,
)
from mlsteps.errors import HERE, UserError, did_you_mean, field_scope, first_line
from mlsteps.recipe.specs.data import DataSpec


def load_rows(
    spec: DataSpec,
    *,
    cache_dir: Path | None = None,
    required: list[str] | tuple[str, ...] = (),
) -> datasets.Dataset:
    """Read the rows a DataSpec points at.

    Errors are about the data field the caller scopes this to (``field_scope("data")``);
    ``cache_dir`` (normally ``ctx.cache_dir``) holds the Arrow caches of local files; hub datasets stay in
    the user's HF cache. A null in one of the
    ``required`` columns is a UserError naming its file and line (found before any shuffle).
    """
    # Our own log lines describe progress; per-file "Generating/Map" bars only add noise.
    datasets.disable_progress_bars()
    located: tuple[list[Path], str, bool] | None = None
    if spec.files:
        ds, origin, located = read_files(spec, cache_dir=cache_dir)
    elif spec.hub:
        ds, origin = read_hub(spec), spec.hub
    elif spec.aligned:
        ds, origin = load_aligned(spec.aligned), ", ".join(spec.aligned.values())
    else:
        assert spec.builtin is not None
        ds, origin = _load_builtin(spec.builtin, spec.split), f"builtin:{spec.builtin}"
    if ds.num_rows == 0:
        raise UserError(f"no rows in {origin}", field=HERE)
    # Rows with a null in a required column are found by their file line, which a shuffle
    # would hide: number the rows first (only when there are nulls at all).
    numbered = bool(required) and first_missing(ds, required) is not None
    if numbered:
        ds = ds.add_column(ROW_NUMBER, list(range(ds.num_rows)))  # type: ignore[arg-type]
    ds = _select(ds, spec, origin)
    if numbered:
        check_missing(ds, required, located)
        ds = ds.remove_columns(ROW_NUMBER)
    return ds


def read_hub(
    spec: DataSpec, *, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """A hub dataset's split: a ``datasets.Dataset``, or with ``streaming`` an
    ``IterableDataset`` read as it is iterated (nothing downloaded up front)."""
    try:
        # The user's HF cache (HF_HOME / HF_DATASETS_CACHE), never the run directory's:
        # a hub dataset is downloaded and prepared once for every run that reads it.
        loaded = datasets.load_dataset(
            spec.hub, spec.hub_config, split=spec.split, revision=spec.revision,
            streaming=streaming,
        )  # fmt: skip
    except Exception as exc:  # network, unknown id, unknown split: all user-fixable
        verb = "stream" if streaming else "load"
        raise UserError(
            f"cannot {verb} hub dataset {spec.hub!r} (config {spec.hub_config}, split "
            f"{spec.split}): {first_line(exc)}",
            field=HERE,
        ) from exc
    wanted = datasets.IterableDataset if streaming else datasets.Dataset
    if not isinstance(loaded, wanted):
        raise UserError(f"hub dataset {spec.hub!r} did not give a single split", field=HERE)
    return loaded


def _select(ds: datasets.Dataset, spec: DataSpec, origin: str) -> datasets.Dataset:
    """shuffle_seed, then the ``rows`` slice, then max_samples."""
    if spec.shuffle_seed is not None:
        ds = ds.shuffle(seed=spec.shuffle_seed)
    if spec.rows is not None:
        kept = spec.row_range(ds.num_rows)
        if not kept:
            raise UserError(
                f"rows '{spec.rows}' keeps none of the {ds.num_rows} rows of {origin}",
                field="rows",
            )
        ds = ds.select(kept)
    if spec.max_samples is not None and spec.max_samples < ds.num_rows:
        ds = ds.select(range(spec.max_samples))
    return ds


def _load_builtin(name: str, split: str) -> datasets.Dataset:
    try:
        from mlsteps.builtin import load_builtin  # type: ignore[attr-defined]
    except ImportError as exc:
        raise UserError(
            "builtin data sets are not available in this installation", field=HERE
        ) from exc
    try:
        rows = load_builtin(name, split)
    except UserError as exc:  # unknown name/split: keep its message, say where it came from
        raise UserError(exc.message, field=HERE, hint=exc.hint) from exc
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise UserError(
            f"builtin data {name!r} (split {split}): {exc}",
            field=HERE,
            hint="see `mlsteps data list`",
        ) from exc
    return datasets.Dataset.from_list(list(rows))


def require_columns(ds: datasets.Dataset, columns: list[str] | tuple[str, ...]) -> None:
    """UserError naming the first missing column and listing the existing ones."""
    existing = list(ds.column_names)
    for column in columns:
        if column not in existing:
            suggestion = did_you_mean(column, existing)
            if not suggestion:
                # The "columns" may be the first data row of a file that has no header.
                check_header_row(ds, column, columns)
            raise UserError(
                f"column {column!r} not found; the data has columns: {', '.join(existing)}",
                field=HERE,
                hint=suggestion or "set the *_column option to one of them",
            )


def split_validation(
    ds: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out ``fraction`` of the rows (at least one) for validation, shuffled with ``seed``.

    Returns ``(train, None)`` when ``fraction`` is 0.
    """
    if fraction <= 0:
        return ds, None
    if ds.num_rows < 2:
        raise UserError(
            f"cannot hold out a validation fraction from {ds.num_rows} row(s)",
            field=HERE,
            hint="add data, give 'validation' explicitly, or set validation_fraction: 0",
        )
    n_val = max(1, min(ds.num_rows - 1, round(ds.num_rows * fraction)))
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# The one column of ``load_text``'s result (a name no user column is likely to have).
TEXT_COLUMN = "__mlsteps_text__"


def load_text(
    sources: list[DataSpec],
    columns: list[str],
    *,
    data_field: str,
    column_field: str,
    cache_dir: Path | None = None,
) -> datasets.Dataset:
    """Every listed column of every source, one after another, as one ``TEXT_COLUMN`` dataset.

    Columns are concatenated whole (all of source 1's first column, then its second, ...), never
    interleaved row by row: two columns of one row (a sentence and its translation) do not end
    up side by side. A source must have at least one of ``columns`` (``column_field`` names the
    field in that error); ``data_field`` is the data field, indexed when there are several
    sources (both relative to the caller's scope).
    """
    parts = []
    for index, source in enumerate(sources):
        place = data_field + (f".{index}" if len(sources) > 1 else "")
        with field_scope(place):
            ds = load_rows(source, cache_dir=cache_dir)
        present = [c for c in columns if c in ds.column_names]
        if not present:
            with field_scope(column_field):
                require_columns(ds, columns[:1])
        for column in present:
            parts.append(ds.select_columns([column]).rename_column(column, TEXT_COLUMN))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

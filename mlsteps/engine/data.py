"""DataSpec -> ``datasets.Dataset``: local files, hub data sets, builtin data; column checks; splits.

Local files are checked before ``datasets`` sees them, so that bad input gives one clear message
naming the file: missing file, glob matching nothing, empty file, bytes that are not UTF-8 (with
the byte offset), unreadable file. Text files give one row per non-empty line in column ``text``.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets

from mlsteps.engine import filepages
from mlsteps.engine.files import (
    ROW_NUMBER,
    check_header_row,
    check_missing,
    first_missing,
    note_header_row,
    require_regular_file,
    wide_encoding,
    wide_encoding_error,
)
from mlsteps.errors import UserError, did_you_mean, first_line
from mlsteps.specs.common import DataSpec

_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
}  # fmt: skip
_GZIP_OK = {"txt", "jsonl", "csv", "tsv"}
_CHUNK_BYTES = 1 << 20


def resolve_files(patterns: list[str], *, where: str) -> list[Path]:
    """Expand paths and globs (``**`` allowed), in the given order, each glob sorted; no duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(
                    f"no file matches {pattern!r}", where=where, hint="check the glob pattern"
                )
            files.extend(Path(m) for m in matches)
            continue
        path = Path(expanded)
        if path.is_symlink() or path.exists():
            # Before anything opens it: a FIFO would block forever, a symlink loop crash later.
            require_regular_file(path, where=where, dir_ok=True)
        if path.is_dir():
            raise UserError(
                f"{pattern!r} is a directory",
                where=where,
                hint=f"use a glob such as '{pattern}/*.txt'",
            )
        if not path.exists():
            raise UserError(
                f"file not found: {pattern}",
                where=where,
                hint="check the path (relative paths start at the working directory)",
            )
        files.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def infer_format(path: Path, declared: str, *, where: str) -> str:
    """The file format: ``declared`` unless 'auto', else from the extension (``.gz`` stripped)."""
    compressed = path.suffix == ".gz"
    suffix = Path(path.stem).suffix if compressed else path.suffix
    fmt = declared if declared != "auto" else _EXTENSIONS.get(suffix.lower())
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {path.name}",
            where=where,
            hint="name it .txt/.jsonl/.json/.csv/.tsv/.parquet or set 'format'",
        )
    if compressed and fmt not in _GZIP_OK:
        raise UserError(
            f"{path.name}: .gz is only supported for txt, jsonl, csv and tsv", where=where
        )
    return fmt


def _open_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_text_file(path: Path, *, where: str) -> None:
    """UserError if ``path`` is unreadable, empty, or not valid UTF-8 (naming the byte offset)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    has_text = False
    note = " (offset in the decompressed text)" if path.suffix == ".gz" else ""
    try:
        with _open_bytes(path) as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                wide = wide_encoding(chunk) if offset == 0 else None
                if wide is not None:
                    raise wide_encoding_error(path, wide, where=where)
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{path} is not valid UTF-8: byte 0x{chunk[exc.start]:02x} at byte offset "
                        f"{offset + exc.start}{note}",
                        where=where,
                        hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    ) from None
                has_text = has_text or bool(text.strip().lstrip("\ufeff"))
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not valid UTF-8: truncated multi-byte character at the end (byte offset {offset - 1}{note})",
            where=where,
        ) from None
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}", where=where) from exc
    if not has_text:
        raise UserError(f"{path} is empty", where=where, hint="point at a file with text in it")


def _load_json_array(path: Path, *, where: str) -> datasets.Dataset:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", where=where
        ) from None
    if isinstance(value, dict):
        # Accept {"data": [...]} style wrappers with exactly one list of records.
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else value
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise UserError(
            f"{path}: expected a JSON array of objects (one per row)",
            where=where,
            hint="use JSON Lines (.jsonl) with one object per line",
        )
    if not value:
        raise UserError(f"{path} has no rows", where=where)
    return datasets.Dataset.from_list(value)


def _diagnose_jsonl(path: Path, *, where: str) -> None:
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON: {exc.msg}", where=where) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line", where=where)


def _load_aligned(aligned: dict[str, str], *, where: str) -> datasets.Dataset:
    """Line-aligned text files, one per column (e.g. multi30k's train.en.gz / train.de.gz)."""
    columns: dict[str, list[str]] = {}
    for column, pattern in aligned.items():
        paths = resolve_files([pattern], where=f"{where}.aligned.{column}")
        if len(paths) != 1:
            raise UserError(
                f"'{pattern}' matches {len(paths)} files; an aligned column needs exactly one",
                where=f"{where}.aligned.{column}",
            )
        check_text_file(paths[0], where=f"{where}.aligned.{column}")
        with _open_bytes(paths[0]) as fh:
            text = fh.read().decode("utf-8-sig")
        columns[column] = text.rstrip("\n").split("\n")
    counts = {c: len(v) for c, v in columns.items()}
    if len(set(counts.values())) > 1:
        raise UserError(
            "aligned files have different line counts: "
            + ", ".join(f"{c} {n}" for c, n in counts.items()),
            where=f"{where}.aligned",
            hint="row i must be line i of every file",
        )
    return datasets.Dataset.from_dict(columns)


def _load_files(
    files: list[Path],
    fmt: str,
    *,
    where: str,
    cache_dir: Path | None,
    column_names: list[str] | None = None,
    txt_unit: str = "line",
    streaming: bool = False,
) -> Any:
    """A ``datasets.Dataset`` of ``files``; with ``streaming``, an ``IterableDataset`` that reads
    them as it is iterated (nothing prepared or cached; json arrays are refused before this)."""
    if fmt == "json":
        parts = [_load_json_array(p, where=where) for p in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    builder, kwargs = {
        "txt": ("text", {}),
        "jsonl": ("json", {}),
        "csv": ("csv", {}),
        # Text in TSV files routinely contains quote characters: never treat them as quoting.
        "tsv": ("csv", {"sep": "\t", "quoting": 3}),
        "parquet": ("parquet", {}),
    }[fmt]
    if fmt == "txt" and txt_unit != "line":
        kwargs = {"sample_by": "document"}  # split into paragraphs below, on any blank line
    if column_names and fmt in ("csv", "tsv"):
        kwargs = {**kwargs, "column_names": column_names, "header": None}
    try:
        ds = datasets.load_dataset(
            builder,
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
            streaming=streaming,
            **kwargs,
        )
    except Exception as exc:  # datasets wraps parser errors in its own types; make them clear
        if fmt == "jsonl":
            for path in files:
                _diagnose_jsonl(path, where=where)
        names = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
        cause = exc.__cause__ or exc
        raise UserError(
            f"cannot read {fmt} data from {names}: {first_line(cause)}",
            where=where,
            hint="all files must be valid and share the same columns",
        ) from exc
    assert isinstance(ds, (datasets.Dataset, datasets.IterableDataset))
    if fmt == "txt":
        # One pass: cut into the rows asked for, drop blank ones and byte-order marks. It reads
        # the whole Arrow file memory-mapped; its pages leave the resident set as it goes, else
        # RSS would grow by the corpus's size (engine/filepages.py).
        pages = filepages.PageReleaser(filepages.arrow_files(ds))

        def rows(batch: dict[str, list[str]]) -> dict[str, list[str]]:
            pages.add(sum(map(len, batch["text"])))
            return {"text": _txt_rows(batch["text"], txt_unit)}

        ds = ds.map(rows, batched=True)
        pages.release()
    return ds


_BLANK_LINE = re.compile(r"\n[ \t\r\u3000]*\n")


def _txt_rows(texts: list[str], unit: str) -> list[str]:
    out: list[str] = []
    for text in texts:
        text = text.lstrip("\ufeff")
        pieces = _BLANK_LINE.split(text) if unit == "paragraph" else [text]
        out.extend(p.strip("\n") for p in pieces if p.strip())
    return out


def load_rows(
    spec: DataSpec,
    *,
    where: str,
    cache_dir: Path | None = None,
    required: list[str] | tuple[str, ...] = (),
) -> datasets.Dataset:
    """Read the rows a DataSpec points at.

    ``where`` names the recipe field for error messages (``stages.pretrain.data``); ``cache_dir``
    (normally ``ctx.cache_dir``) holds the Arrow caches of local files; hub datasets stay in
    the user's HF cache. A null in one of the
    ``required`` columns is a UserError naming its file and line (found before any shuffle).
    """
    # Our own log lines describe progress; per-file "Generating/Map" bars only add noise.
    datasets.disable_progress_bars()
    if spec.files:
        files = resolve_files(spec.files, where=where)
        formats = {infer_format(p, spec.format, where=where) for p in files}
        if len(formats) > 1:
            raise UserError(
                f"files mix formats ({', '.join(sorted(formats))})",
                where=where,
                hint="use one format per data entry",
            )
        fmt = formats.pop()
        for path in files:
            if fmt == "parquet":
                if not os.access(path, os.R_OK):
                    raise UserError(f"cannot read {path}: permission denied", where=where)
                if path.stat().st_size == 0:
                    raise UserError(f"{path} is empty", where=where)
            else:
                check_text_file(path, where=where)
        ds = _load_files(
            files,
            fmt,
            where=where,
            cache_dir=cache_dir,
            column_names=spec.columns,
            txt_unit=spec.txt_unit,
        )
        origin = ", ".join(p.name for p in files[:3])
        if fmt in ("csv", "tsv") and not spec.columns:
            note_header_row(ds, files[0])  # a missing column may mean a file without a header
    elif spec.hub:
        try:
            # The user's HF cache (HF_HOME / HF_DATASETS_CACHE), never the run directory's:
            # a hub dataset is downloaded and prepared once for every run that reads it.
            loaded = datasets.load_dataset(
                spec.hub, spec.hub_config, split=spec.split, revision=spec.revision
            )
        except Exception as exc:  # network, unknown id, unknown split: all user-fixable
            raise UserError(
                f"cannot load hub dataset {spec.hub!r} (config {spec.hub_config}, split {spec.split}): "
                f"{first_line(exc)}",
                where=where,
            ) from exc
        if not isinstance(loaded, datasets.Dataset):
            raise UserError(f"hub dataset {spec.hub!r} did not give a single split", where=where)
        ds, origin = loaded, spec.hub
    elif spec.aligned:
        ds, origin = _load_aligned(spec.aligned, where=where), ", ".join(spec.aligned.values())
    else:
        assert spec.builtin is not None
        ds, origin = _load_builtin(spec.builtin, spec.split, where=where), f"builtin:{spec.builtin}"
    if ds.num_rows == 0:
        raise UserError(f"no rows in {origin}", where=where)
    # Rows with a null in a required column are found by their file line, which a shuffle
    # would hide: number the rows first (only when there are nulls at all).
    numbered = bool(required) and first_missing(ds, required) is not None
    if numbered:
        ds = ds.add_column(ROW_NUMBER, list(range(ds.num_rows)))  # type: ignore[arg-type]
    if spec.shuffle_seed is not None:
        ds = ds.shuffle(seed=spec.shuffle_seed)
    if spec.rows is not None:
        kept = spec.row_range(ds.num_rows)
        if not kept:
            raise UserError(
                f"rows '{spec.rows}' keeps none of the {ds.num_rows} rows of {origin}",
                where=f"{where}.rows",
            )
        ds = ds.select(kept)
    if spec.max_samples is not None and spec.max_samples < ds.num_rows:
        ds = ds.select(range(spec.max_samples))
    if numbered:
        located = (files, fmt, not spec.columns) if spec.files else None
        check_missing(ds, required, located, where=where)
        ds = ds.remove_columns(ROW_NUMBER)
    return ds


def _load_builtin(name: str, split: str, *, where: str) -> datasets.Dataset:
    try:
        from mlsteps.builtin import load_builtin  # type: ignore[attr-defined]
    except ImportError as exc:
        raise UserError(
            "builtin data sets are not available in this installation", where=where
        ) from exc
    try:
        rows = load_builtin(name, split)
    except UserError as exc:  # unknown name/split: keep its message, say where it came from
        raise UserError(exc.message, where=where, hint=exc.hint) from exc
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise UserError(
            f"builtin data {name!r} (split {split}): {exc}",
            where=where,
            hint="see `mlsteps data list`",
        ) from exc
    return datasets.Dataset.from_list(list(rows))


def require_columns(ds: datasets.Dataset, columns: list[str] | tuple[str, ...], where: str) -> None:
    """UserError naming the first missing column and listing the existing ones."""
    existing = list(ds.column_names)
    for column in columns:
        if column not in existing:
            suggestion = did_you_mean(column, existing)
            if not suggestion:
                # The "columns" may be the first data row of a file that has no header.
                check_header_row(ds, column, columns, where=where)
            raise UserError(
                f"column {column!r} not found; the data has columns: {', '.join(existing)}",
                where=where,
                hint=suggestion or "set the *_column option to one of them",
            )


def split_validation(
    ds: datasets.Dataset, fraction: float, seed: int, *, where: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out ``fraction`` of the rows (at least one) for validation, shuffled with ``seed``.

    Returns ``(train, None)`` when ``fraction`` is 0.
    """
    if fraction <= 0:
        return ds, None
    if ds.num_rows < 2:
        raise UserError(
            f"cannot hold out a validation fraction from {ds.num_rows} row(s)",
            where=where,
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
    where: str,
    column_where: str,
    cache_dir: Path | None = None,
) -> datasets.Dataset:
    """Every listed column of every source, one after another, as one ``TEXT_COLUMN`` dataset.

    Columns are concatenated whole (all of source 1's first column, then its second, ...), never
    interleaved row by row: two columns of one row (a sentence and its translation) do not end
    up side by side. A source must have at least one of ``columns`` (``column_where`` names the
    field in that error); ``where`` is the data field, indexed when there are several sources.
    """
    parts = []
    for index, source in enumerate(sources):
        place = where + (f".{index}" if len(sources) > 1 else "")
        ds = load_rows(source, where=place, cache_dir=cache_dir)
        present = [c for c in columns if c in ds.column_names]
        if not present:
            require_columns(ds, columns[:1], column_where)
        for column in present:
            parts.append(ds.select_columns([column]).rename_column(column, TEXT_COLUMN))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

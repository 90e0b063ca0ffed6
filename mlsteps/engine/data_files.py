"""Local data files -> ``datasets.Dataset``: globs, the format by extension (gzip too), each file
checked before ``datasets`` reads it (missing, empty, not UTF-8 with the byte offset, invalid
JSON by line), json arrays, txt lines or paragraphs, line-aligned files. ``data.load_rows`` reads
every other source and the row selection on top.
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
    note_header_row,
    require_regular_file,
    wide_encoding,
    wide_encoding_error,
)
from mlsteps.errors import HERE, UserError, field_scope, first_line
from mlsteps.recipe.specs.data import DataSpec

_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
}  # fmt: skip
_GZIP_OK = {"txt", "jsonl", "csv", "tsv"}
_CHUNK_BYTES = 1 << 20


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand paths and globs (``**`` allowed), in the given order, each glob sorted; no duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(
                    f"no file matches {pattern!r}", field=HERE, hint="check the glob pattern"
                )
            files.extend(Path(m) for m in matches)
            continue
        path = Path(expanded)
        if path.is_symlink() or path.exists():
            # Before anything opens it: a FIFO would block forever, a symlink loop crash later.
            require_regular_file(path, dir_ok=True)
        if path.is_dir():
            raise UserError(
                f"{pattern!r} is a directory",
                field=HERE,
                hint=f"use a glob such as '{pattern}/*.txt'",
            )
        if not path.exists():
            raise UserError(
                f"file not found: {pattern}",
                field=HERE,
                hint="check the path (relative paths start at the working directory)",
            )
        files.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def infer_format(path: Path, declared: str) -> str:
    """The file format: ``declared`` unless 'auto', else from the extension (``.gz`` stripped)."""
    compressed = path.suffix == ".gz"
    suffix = Path(path.stem).suffix if compressed else path.suffix
    fmt = declared if declared != "auto" else _EXTENSIONS.get(suffix.lower())
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {path.name}",
            field=HERE,
            hint="name it .txt/.jsonl/.json/.csv/.tsv/.parquet or set 'format'",
        )
    if compressed and fmt not in _GZIP_OK:
        raise UserError(
            f"{path.name}: .gz is only supported for txt, jsonl, csv and tsv", field=HERE
        )
    return fmt


def _open_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_text_file(path: Path) -> None:
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
                    raise wide_encoding_error(path, wide)
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{path} is not valid UTF-8: byte 0x{chunk[exc.start]:02x} at byte offset "
                        f"{offset + exc.start}{note}",
                        field=HERE,
                        hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    ) from None
                has_text = has_text or bool(text.strip().lstrip("\ufeff"))
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not valid UTF-8: truncated multi-byte character at the end (byte offset {offset - 1}{note})",
            field=HERE,
        ) from None
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}", field=HERE) from exc
    if not has_text:
        raise UserError(f"{path} is empty", field=HERE, hint="point at a file with text in it")


def _load_json_array(path: Path) -> datasets.Dataset:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", field=HERE
        ) from None
    if isinstance(value, dict):
        # Accept {"data": [...]} style wrappers with exactly one list of records.
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else value
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise UserError(
            f"{path}: expected a JSON array of objects (one per row)",
            field=HERE,
            hint="use JSON Lines (.jsonl) with one object per line",
        )
    if not value:
        raise UserError(f"{path} has no rows", field=HERE)
    return datasets.Dataset.from_list(value)


def _diagnose_jsonl(path: Path) -> None:
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON: {exc.msg}", field=HERE) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line", field=HERE)


def load_aligned(aligned: dict[str, str]) -> datasets.Dataset:
    """Line-aligned text files, one per column (e.g. multi30k's train.en.gz / train.de.gz)."""
    columns: dict[str, list[str]] = {}
    for column, pattern in aligned.items():
        with field_scope(f"aligned.{column}"):
            paths = resolve_files([pattern])
            if len(paths) != 1:
                raise UserError(
                    f"'{pattern}' matches {len(paths)} files; an aligned column needs exactly one",
                    field=HERE,
                )
            check_text_file(paths[0])
        with _open_bytes(paths[0]) as fh:
            text = fh.read().decode("utf-8-sig")
        columns[column] = text.rstrip("\n").split("\n")
    counts = {c: len(v) for c, v in columns.items()}
    if len(set(counts.values())) > 1:
        raise UserError(
            "aligned files have different line counts: "
            + ", ".join(f"{c} {n}" for c, n in counts.items()),
            field="aligned",
            hint="row i must be line i of every file",
        )
    return datasets.Dataset.from_dict(columns)


def _load_files(
    files: list[Path],
    fmt: str,
    *,
    cache_dir: Path | None,
    column_names: list[str] | None = None,
    txt_unit: str = "line",
    streaming: bool = False,
) -> Any:
    """A ``datasets.Dataset`` of ``files``; with ``streaming``, an ``IterableDataset`` that reads
    them as it is iterated (nothing prepared or cached; json arrays are refused before this)."""
    if fmt == "json":
        parts = [_load_json_array(p) for p in files]
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
                _diagnose_jsonl(path)
        names = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
        cause = exc.__cause__ or exc
        raise UserError(
            f"cannot read {fmt} data from {names}: {first_line(cause)}",
            field=HERE,
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


def read_files(
    spec: DataSpec, *, cache_dir: Path | None
) -> tuple[datasets.Dataset, str, tuple[list[Path], str, bool]]:
    """Local files, each checked first: (rows, where they came from, how to find a row's file
    line: files, format, whether the first line is a header)."""
    assert spec.files is not None
    files = resolve_files(spec.files)
    formats = {infer_format(p, spec.format) for p in files}
    if len(formats) > 1:
        raise UserError(
            f"files mix formats ({', '.join(sorted(formats))})",
            field=HERE,
            hint="use one format per data entry",
        )
    fmt = formats.pop()
    for path in files:
        if fmt == "parquet":
            if not os.access(path, os.R_OK):
                raise UserError(f"cannot read {path}: permission denied", field=HERE)
            if path.stat().st_size == 0:
                raise UserError(f"{path} is empty", field=HERE)
        else:
            check_text_file(path)
    ds = _load_files(
        files,
        fmt,
        cache_dir=cache_dir,
        column_names=spec.columns,
        txt_unit=spec.txt_unit,
    )
    if fmt in ("csv", "tsv") and not spec.columns:
        note_header_row(ds, files[0])  # a missing column may mean a file without a header
    return ds, ", ".join(p.name for p in files[:3]), (files, fmt, not spec.columns)

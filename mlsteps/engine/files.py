"""Files that are not what they claim: checks made before a data or model file is opened.

- Only regular files (and directories where one is expected) are read: a FIFO blocks ``open``
  forever, a device file never ends, a symlink loop fails deep inside a library. ``os.stat``
  tells all of them apart without opening anything.
- A byte-order mark says which encoding a text file really has: UTF-16/32 files are named as
  such (with the iconv command that converts them) instead of being called broken UTF-8.
- A model directory's JSON files must parse and its ``*.safetensors`` files must be
  safetensors (not truncated, not a pickle under that name), so that a damaged download or copy
  is named file by file instead of surfacing as a raw library error.
- A missing value is located by file and line before any shuffle renumbers the rows.
"""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlsteps.errors import HERE, UserError

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symlink loop (it points back at itself)",
                field=HERE,
                hint="point the link at a real file",
            ) from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise UserError(
                f"{path} is a broken symlink (to {os.readlink(path)})",
                field=HERE,
                hint="point the link at an existing file",
            ) from None
        raise UserError(f"cannot read {path}: {exc.strerror}", field=HERE) from None


def require_regular_file(path: Path, *, dir_ok: bool = False) -> None:
    """UserError unless ``path`` is a regular file (or a directory when ``dir_ok``), never opening it."""
    mode = _stat(path).st_mode
    if stat.S_ISREG(mode) or (dir_ok and stat.S_ISDIR(mode)):
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory, expected a file", field=HERE)
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    raise UserError(
        f"{path} is {kind}, not a regular file; mlsteps reads only regular files",
        field=HERE,
        hint="copy the data into a file first",
    )


# Longest marks first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32LE"),
    (b"\x00\x00\xfe\xff", "UTF-32BE"),
    (b"\xff\xfe", "UTF-16LE"),
    (b"\xfe\xff", "UTF-16BE"),
)


def wide_encoding(head: bytes) -> str | None:
    """'UTF-16LE', 'UTF-32BE', ... when ``head`` starts with that byte-order mark, else None.

    (A UTF-8 byte-order mark is not reported: UTF-8 readers here strip it.)"""
    for mark, name in _BOMS:
        if head.startswith(mark):
            return name
    return None


def wide_encoding_error(path: Path, encoding: str) -> UserError:
    family = encoding[:6]  # UTF-16 / UTF-32: iconv reads the byte-order mark for the byte order
    return UserError(
        f"{path} is {encoding} text (it starts with a {family} byte-order mark), not UTF-8",
        field=HERE,
        hint=f"convert it: iconv -f {family} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}",
    )


# ---------------------------------------------------------------- model directories

_BAD_MODEL_HINT = (
    "the file is damaged or incomplete: copy or download the model again, or rerun the stage "
    "that wrote it"
)


def _safetensors_problem(path: Path) -> str | None:
    from mlsteps.engine.checkpoints import safetensors_intact

    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (a torch.save pickle), not safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "is a Python pickle, not safetensors"
    if not safetensors_intact(path):
        return "is not a complete safetensors file (truncated or damaged)"
    return None


def check_model_dir(source: str) -> None:
    """UserError naming the first file of a local model/tokenizer directory that cannot be
    what its name claims; nothing for hub ids.

    Checked without loading any weights: every entry is a regular file or directory (no FIFO,
    device, socket or symlink loop), every ``*.json`` parses, every ``*.safetensors`` has a
    header covering the whole file and is no pickle.
    """
    path = Path(source).expanduser()
    if not (path.exists() or path.is_symlink()):
        return  # a hub id (or a missing path: the loader says so)
    require_regular_file(path, dir_ok=True)
    if not path.is_dir():
        raise UserError(
            f"{path} is a file; a model or tokenizer is a directory",
            field=HERE,
            hint="point at the directory that holds config.json / tokenizer.json",
        )
    for entry in sorted(path.iterdir()):
        require_regular_file(entry, dir_ok=True)
        if entry.is_dir():
            continue
        if entry.suffix == ".json":
            try:
                json.loads(entry.read_bytes().decode("utf-8-sig"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(
                    f"{entry} is not valid JSON ({str(exc).splitlines()[0]})",
                    field=HERE,
                    hint=_BAD_MODEL_HINT,
                ) from None
        elif entry.suffix == ".safetensors":
            problem = _safetensors_problem(entry)
            if problem is not None:
                hint = _BAD_MODEL_HINT
                if "pickle" in problem:
                    hint = (
                        "load it with torch and write it again with "
                        "save_pretrained(..., safe_serialization=True)"
                    )
                raise UserError(f"{entry} {problem}", field=HERE, hint=hint)


# ---------------------------------------------------------------- where a row came from


def _open_text(path: Path) -> Any:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _count_rows(path: Path, fmt: str) -> list[int]:
    """The 1-based line (or, for json/parquet, the record number) of every row of one file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(range(1, pq.ParquetFile(path).metadata.num_rows + 1))
    if fmt == "json":
        value = json.loads(path.read_text(encoding="utf-8-sig"))
        if isinstance(value, dict):
            lists = [v for v in value.values() if isinstance(v, list)]
            value = lists[0] if len(lists) == 1 else []
        return list(range(1, len(value) + 1))
    with _open_text(path) as handle:
        if fmt == "csv":
            reader = csv.reader(handle)
            lines, start = [], 1
            for record in reader:
                if record:  # pandas skips blank lines
                    lines.append(start)
                start = reader.line_num + 1
            return lines
        return [n for n, line in enumerate(handle, start=1) if line.strip()]


def locate_row(files: Sequence[Path], fmt: str, index: int, *, header: bool) -> str:
    """``file:line`` (``file, row N`` for json/parquet) of row ``index`` of the files read in order."""
    for path in files:
        lines = _count_rows(path, fmt)
        if header and fmt in ("csv", "tsv"):
            lines = lines[1:]
        if index < len(lines):
            if fmt in ("json", "parquet"):
                return f"{path}, row {lines[index]}"
            return f"{path}:{lines[index]}"
        index -= len(lines)
    return f"row {index + 1}"


def first_missing(ds: Any, columns: Sequence[str]) -> tuple[str, int] | None:
    """(column, row index) of the first null among ``columns`` of a datasets.Dataset, else None.

    Read from the Arrow columns (null counts first), so a clean data set costs no row scan."""
    best: tuple[str, int] | None = None
    table = ds.data
    for column in columns:
        if column not in ds.column_names:
            continue
        values = table.column(column)
        if values.null_count == 0:
            continue
        import pyarrow.compute as pc

        index = pc.index(pc.is_null(values), True).as_py()
        if index >= 0 and (best is None or index < best[1]):
            best = (column, index)
    return best


# A column load_rows adds while it looks for nulls: the row's position in the files.
ROW_NUMBER = "__mlsteps_row_number__"


def check_missing(
    ds: Any,
    required: Sequence[str],
    located: tuple[Sequence[Path], str, bool] | None,
) -> None:
    """UserError at the null of a ``required`` column that comes first in the files.

    ``ds`` has the ``ROW_NUMBER`` column (numbered before any shuffle); ``located`` is
    (files, format, has header row) for local files, None for other sources (row number only).
    """
    present = [c for c in required if c in ds.column_names]
    values = ds.select_columns([*present, ROW_NUMBER])[:]
    first: tuple[int, str] | None = None
    for column in present:
        for number, value in zip(values[ROW_NUMBER], values[column], strict=True):
            if value is None and (first is None or number < first[0]):
                first = (number, column)
    if first is None:
        return
    index, column = first
    if located is None:
        place = f"row {index + 1}"
    else:
        files, fmt, header = located
        place = locate_row(files, fmt, index, header=header)
    raise UserError(
        f"{place}: column '{column}' has no value (null)",
        field=HERE,
        hint="fill it in or drop that row",
    )


_HEADER_NOTE = "mlsteps: column names from the header row of "


def note_header_row(ds: Any, path: Path) -> None:
    """Remember (in the dataset's info, which survives shuffle and select) that the column
    names of ``ds`` come from the first line of ``path``."""
    ds.info.description = _HEADER_NOTE + str(path)


def _looks_like_data(names: Sequence[str]) -> bool:
    """Whether header names look like a row of data: a number, a long text, or mostly words
    with spaces (real headers are short identifiers: 'sentence', 'label')."""

    def numeric(name: str) -> bool:
        try:
            float(name)
        except ValueError:
            return False
        return True

    spaced = sum(1 for n in names if len(str(n).split()) > 1)
    return any(numeric(str(n)) or len(str(n)) > 40 for n in names) or 2 * spaced > len(names)


def check_header_row(ds: Any, column: str, wanted: Sequence[str]) -> None:
    """For a missing ``column`` of csv/tsv rows whose header row looks like data: UserError
    saying the file may have no header (its first row became the names) and how to name them."""
    note = getattr(ds.info, "description", None) or ""
    existing = list(ds.column_names)
    if not note.startswith(_HEADER_NOTE) or not _looks_like_data(existing):
        return
    names = list(wanted)[: len(existing)]
    names += [f"col{i + 1}" for i in range(len(names), len(existing))]
    raise UserError(
        f"column {column!r} not found; the data has columns: {', '.join(existing)}, read from "
        f"the first line of {note[len(_HEADER_NOTE) :]}, which looks like data: the file may "
        "have no header row",
        field=HERE,
        hint="then name the columns in the data entry, e.g. data: {files: [...], "
        f"columns: [{', '.join(names)}]}}",
    )

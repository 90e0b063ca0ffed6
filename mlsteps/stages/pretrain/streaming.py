"""Streamed pretraining text (``streaming: true`` on a data source).

A streamed source is read through ``datasets.load_dataset(..., streaming=True)``: an
``IterableDataset`` that reads local files or a hub dataset as it is iterated, with nothing
prepared or cached first. ``packing.pack_corpus`` tokenises and packs it shard by shard into the
same cached block files as a prepared source, so training, the cache and exact resume are those
of any other corpus; only the text is never held, not even as an Arrow copy on disk.

A stream cannot be fingerprinted by content without reading it, so its packed-data cache key
is its identity instead: local files by their bytes (hashed with plain reads, which leave no
pages in the process), hub data by name, config, split and revision (the commit the hub
resolves when none is pinned). Sources that are not streamed in the same list are read as
usual and keyed by content (``packing.corpus_fingerprint``), then streamed from their Arrow file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets

from mlsteps.engine.data import TEXT_COLUMN, load_rows, read_hub, require_columns
from mlsteps.engine.data_files import _load_files, check_text_file, infer_format, resolve_files
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.stages.pretrain.packing import FORMAT_VERSION, corpus_fingerprint


@dataclass
class StreamedText:
    """The text of a data field as one ``TEXT_COLUMN`` stream, and the key of its content."""

    dataset: datasets.IterableDataset
    fingerprint: str


def any_streamed(sources: list[DataSpec]) -> bool:
    return any(s.streaming for s in sources)


def _file_digest(path: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hub_commit(spec: DataSpec) -> str | None:
    """The commit a hub dataset's revision points at now (None offline: then the name is the
    identity, and a changed dataset behind an unpinned name reuses stale blocks; pin 'revision')."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(spec.hub, revision=spec.revision).sha  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - offline or no hub access: the name is all there is
        return None


def _open(spec: DataSpec) -> tuple[datasets.IterableDataset, dict[str, Any]]:
    """The stream of one source; errors are about the source's field (the caller scopes it)."""
    for key, what, fix in spec._invalid()[:1]:  # named validation sets are not walked up front
        raise UserError(what, field=key, hint=fix)
    if spec.files:
        files = resolve_files(spec.files)
        formats = {infer_format(p, spec.format) for p in files}
        if len(formats) > 1:
            raise UserError(f"files mix formats ({', '.join(sorted(formats))})", field=HERE)
        fmt = formats.pop()
        for path in files:
            if fmt != "parquet":
                check_text_file(path)
        ident = {
            "files": [_file_digest(p) for p in files],
            "format": fmt,
            "txt_unit": spec.txt_unit,
            "columns": spec.columns,
        }
        ds = _load_files(
            files, fmt, cache_dir=None, column_names=spec.columns,
            txt_unit=spec.txt_unit, streaming=True,
        )  # fmt: skip
    else:
        assert spec.hub is not None  # DataSpec._invalid refuses builtin and aligned
        ident = {
            "hub": spec.hub,
            "config": spec.hub_config,
            "split": spec.split,
            "revision": _hub_commit(spec) or spec.revision,
        }
        ds = read_hub(spec, streaming=True)
    if spec.max_samples is not None:
        ds = ds.take(spec.max_samples)
    return ds, {**ident, "max_samples": spec.max_samples}


def _columns(ds: datasets.IterableDataset) -> list[str]:
    """Column names of a stream; formats without a schema (json) are peeked at their first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    for row in ds.take(1):
        return list(row)
    raise UserError("no rows in the streamed data", field=HERE)


def load_streamed_text(
    sources: list[DataSpec],
    columns: list[str],
    *,
    data_field: str,
    column_field: str,
    cache_dir: Any = None,
) -> StreamedText:
    """``engine.data.load_text`` for a field with streamed sources: every listed column of every
    source, one after another (columns whole, never interleaved), as one stream. The fields are
    relative to the caller's scope, as there."""
    parts, idents = [], []
    for index, source in enumerate(sources):
        place = data_field + (f".{index}" if len(sources) > 1 else "")
        if source.streaming:
            with field_scope(place):
                stream, ident = _open(source)
                names = _columns(stream)
            present = [c for c in columns if c in names]
            if not present:
                raise UserError(
                    f"none of the columns {', '.join(columns)} is in the streamed data; it has "
                    f"columns: {', '.join(names)}",
                    field=column_field,
                    hint="set text_column to one of them",
                )
            for column in present:
                parts.append(stream.select_columns([column]).rename_column(column, TEXT_COLUMN))
                idents.append({**ident, "column": column})
            continue
        with field_scope(place):
            rows = load_rows(source, cache_dir=cache_dir)
        present = [c for c in columns if c in rows.column_names]
        if not present:
            with field_scope(column_field):
                require_columns(rows, columns[:1])
        for column in present:
            part = rows.select_columns([column]).rename_column(column, TEXT_COLUMN)
            idents.append({"content": corpus_fingerprint(part, TEXT_COLUMN)})
            parts.append(part.to_iterable_dataset())
    stream = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    body = json.dumps({"streamed": idents, "version": FORMAT_VERSION}, sort_keys=True)
    return StreamedText(stream, hashlib.blake2b(body.encode(), digest_size=20).hexdigest())

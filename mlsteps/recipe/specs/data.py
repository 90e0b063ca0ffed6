"""Where a stage's rows come from: the DataSpec (files, hub, builtin, aligned) and the fields
that take one source or several."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from mlsteps.recipe.specs.base import Bool, PositiveInt, Seed, Strict, Unused

# File extensions -> format (the same table as engine/data.py, kept here free of heavy imports).
_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
}  # fmt: skip
# DataSpec.rows: START:END, each an optional (negative) row number or a percent.
_ROWS_RE = re.compile(r"^\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*$")


class DataSpec(Strict):
    """Where a stage's rows come from: local files, a hub dataset, or the project's builtin data.

    Exactly one of ``files``, ``hub``, ``builtin`` or ``aligned`` is set. A plain string is accepted as a
    shorthand: ``builtin:NAME`` for builtin data, otherwise a file path or glob.
    """

    files: list[str] | None = Field(
        None,
        description="Local files or glob patterns (txt, jsonl, json, csv, tsv, parquet; .gz allowed "
        "for txt/jsonl/csv/tsv). Relative paths are resolved against the working directory.",
    )
    hub: str | None = Field(None, description="A Hugging Face hub dataset id, e.g. 'wikitext'.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    builtin: str | None = Field(
        None,
        description="A builtin data set of mlsteps, e.g. 'toy/translate' (see `mlsteps data list`).",
    )
    aligned: dict[str, str] | None = Field(
        None,
        description="Line-aligned plain-text files, one per column (.gz allowed), e.g. "
        "{source: train.en.gz, target: train.de.gz}: row i is line i of every file.",
    )
    columns: list[str] | None = Field(
        None,
        description="Column names for csv/tsv files without a header row (the first line is "
        "then data, not names).",
    )
    split: str = Field(
        "train",
        description="Split to read from a hub or builtin data set (local files have none).",
    )
    format: Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto", description="File format; 'auto' infers it from the file extension."
    )
    txt_unit: Literal["line", "paragraph", "file"] = Field(
        "line",
        description="What one row of a .txt file is: a line (blank lines dropped), a paragraph "
        "(lines up to a blank line, joined with newlines: hard-wrapped prose), or the whole "
        "file.",
    )
    shuffle_seed: Seed | None = Field(
        None,
        description="Shuffle the rows with this seed first, before 'rows' and max_samples. The "
        "same seed gives the same order in every stage, so two stages can take disjoint parts of "
        "one file (rows ':95%' and '95%:').",
    )
    rows: str | None = Field(
        None,
        description="Keep a slice of the rows, Python style, by count or percent: '0:1000', "
        "':90%', '90%:', '-500:'. Applied after reading and shuffle_seed, before max_samples; "
        "lets one file give both a training and a held-out part.",
    )
    max_samples: PositiveInt | None = Field(
        None, description="Keep only the first N rows (after reading and 'rows', before any split)."
    )
    revision: str | None = Field(
        None,
        description="Hub dataset revision (branch, tag or commit) to read; pinning a commit also "
        "pins the packed-data cache entry of a streamed source.",
    )
    streaming: Bool = Field(
        False,
        description="pretrain only: read the files or hub dataset as a stream (datasets' "
        "IterableDataset), tokenised and packed shard by shard without preparing or holding the "
        "corpus. Read once, in order: no shuffle_seed, no 'rows', no json arrays, and the stage "
        "needs 'validation' (or validation_fraction: 0).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("builtin:"):
                return {"builtin": value.removeprefix("builtin:")}
            return {"files": [value]}
        if isinstance(value, list):
            return {"files": value}
        if isinstance(value, dict) and isinstance(value.get("files"), str):
            return {**value, "files": [value["files"]]}
        return value

    @field_validator("rows")
    @classmethod
    def _rows_is_a_slice(cls, value: str | None) -> str | None:
        if value is not None and not _ROWS_RE.match(value):
            raise ValueError(
                f"rows {value!r} is not a slice START:END of row numbers or percents "
                "(e.g. ':90%', '90%:', '100:200', '-500:')"
            )
        return value

    def row_range(self, n_rows: int) -> range:
        """The rows ``rows`` keeps out of ``n_rows`` (all of them when unset)."""
        if self.rows is None:
            return range(n_rows)

        def bound(text: str, default: int) -> int:
            text = text.strip()
            if not text:
                return default
            if text.endswith("%"):
                return round(n_rows * int(text[:-1]) / 100)
            return int(text)

        start, _, stop = self.rows.partition(":")
        return range(n_rows)[slice(bound(start, 0), bound(stop, n_rows))]

    def file_format(self) -> str | None:
        """The format of ``files``: declared, else from the patterns' extension (None: unknown)."""
        if self.format != "auto" or not self.files:
            return self.format if self.files else None
        found = set()
        for pattern in self.files:
            name = pattern.lower().removesuffix(".gz")
            found.add(next((f for e, f in _EXTENSIONS.items() if name.endswith(e)), None))
        return found.pop() if len(found) == 1 else None

    def _ignored(self) -> list[Unused]:
        out = []
        if self.files or self.aligned:
            out += self._unused(
                ("split",),
                "local files are read whole (split picks a part of hub or builtin data)",
                "remove it; keep a part of the rows with 'rows'",
            )
        if not self.hub:
            out += self._unused(("hub_config", "revision"), "the data is not from the hub")
        if not self.files:
            out += self._unused(("format", "columns", "txt_unit"), "the data is not local 'files'")
            return out
        fmt = self.file_format()
        if fmt is not None and fmt not in ("csv", "tsv"):
            out += self._unused(("columns",), f"the files are {fmt}, not headerless csv/tsv")
        if fmt is not None and fmt != "txt":
            out += self._unused(("txt_unit",), f"the files are {fmt}, not txt")
        return out

    def _invalid(self) -> list[Unused]:
        if not self.streaming:
            return []
        if self.builtin or self.aligned:
            what = "builtin" if self.builtin else "aligned"
            return [("streaming", f"'{what}' data cannot be streamed", "remove streaming")]
        why = "cannot be combined with streaming: true (a stream is read once, in order"
        found = [
            ("shuffle_seed", f"shuffle_seed {why})", "shuffle the files beforehand, or remove one"),
            ("rows", f"rows {why}, without a row count)", "use max_samples, or remove one"),
        ]
        out = [f for f in found if getattr(self, f[0]) is not None]
        if self.files and self.file_format() == "json":
            what = "a json array file cannot be streamed"
            out.append(("streaming", what, "convert it to jsonl, or remove streaming"))
        return out

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSpec:
        given = [k for k in ("files", "hub", "builtin", "aligned") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'files', 'hub', 'builtin' or 'aligned'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


def _as_sources(value: Any) -> Any:
    """One data source or a list of them -> a list of sources.

    A list of mappings or ``builtin:`` names is several sources; a list of plain paths stays one
    source with several files (the DataSpec shorthand).
    """
    if isinstance(value, list) and any(
        isinstance(v, dict) or (isinstance(v, str) and v.startswith("builtin:")) for v in value
    ):
        return value
    return [value]


# A field that takes one DataSpec or a list of them (trained on together); always a list after
# validation. Overrides still reach below a single source (``data.max_samples=5``): they apply
# to the recipe text, before this runs.
DataSources = Annotated[list[DataSpec], BeforeValidator(_as_sources), Field(min_length=1)]


def column_list(value: str | list[str]) -> list[str]:
    """A ``text_column`` field (one name or a list) as a list."""
    return [value] if isinstance(value, str) else list(value)

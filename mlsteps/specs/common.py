"""Recipe building blocks shared by several stage kinds.

Every model is strict (``extra="forbid"``) and every field carries a description: the
descriptions feed ``mlsteps schema`` and the recipe reference in the README.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]

# Stage and run names become directory names: keep them to one safe path component.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# DataSpec.rows: START:END, each an optional (negative) row number or a percent.
_ROWS_RE = re.compile(r"^\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*$")


class Strict(BaseModel):
    """Base for all recipe models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


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
        description="Split to read from a hub or builtin data set (ignored for local files).",
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
    shuffle_seed: int | None = Field(
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


class TrainSpec(Strict):
    """Optimisation settings passed to the transformers Trainer."""

    lr: PositiveFloat = Field(5e-4, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Linear warmup steps.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    batch_size: PositiveInt = Field(8, description="Per-device batch size (sequences).")
    grad_accum_steps: PositiveInt = Field(1, description="Gradient accumulation steps.")
    max_grad_norm: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Gradient clipping norm (0 disables clipping)."
    )
    max_steps: PositiveInt | None = Field(
        None, description="Total optimizer steps; overrides 'epochs' when set."
    )
    epochs: PositiveFloat = Field(1.0, description="Number of passes over the training data.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' uses bf16 where the hardware supports it, else fp32."
    )
    fused_adamw: bool = Field(
        True, description="Use fused AdamW where torch provides it (faster optimizer step)."
    )
    compile: bool = Field(False, description="Wrap the model with torch.compile.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory by recomputing activations."
    )
    eval_every_steps: PositiveInt | None = Field(
        None, description="Evaluate on the validation split every N steps (and always at the end)."
    )
    save_every_steps: PositiveInt = Field(
        200, description="Write a resumable checkpoint every N optimizer steps."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Keep the newest K complete checkpoints.")
    log_every_steps: PositiveInt = Field(10, description="Log training metrics every N steps.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding)."
    )
    dataloader_workers: NonNegativeInt = Field(0, description="DataLoader worker processes.")


class ArchSpec(Strict):
    """A model built from scratch from a transformers config (vocab size comes from the tokenizer)."""

    family: Literal["gpt2", "llama", "bert", "roberta", "t5", "bart"] = Field(
        ..., description="Model family (transformers config class)."
    )
    n_layers: PositiveInt = Field(2, description="Number of transformer layers (per stack).")
    hidden_size: PositiveInt = Field(64, description="Model width d_model.")
    n_heads: PositiveInt = Field(2, description="Attention heads; must divide hidden_size.")
    intermediate_size: PositiveInt | None = Field(
        None, description="Feed-forward width; default 4 x hidden_size."
    )
    max_positions: PositiveInt = Field(
        512, description="Maximum sequence length the position embeddings cover."
    )
    dropout: Fraction = Field(0.0, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ArchSpec:
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide hidden_size ({self.hidden_size})"
            )
        return self


class GenerationSpec(Strict):
    """Decoding settings for generation (validation, eval, predict)."""

    max_new_tokens: PositiveInt = Field(64, description="Maximum tokens generated per input.")
    num_beams: PositiveInt = Field(1, description="Beam search width (1 = greedy or sampling).")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature.")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Nucleus sampling mass.")
    top_k: NonNegativeInt = Field(0, description="Top-k sampling (0 disables).")
    repetition_penalty: PositiveFloat = Field(
        1.0,
        description="Divides the score of every token already in the sequence (> 1 discourages "
        "repeats, 1 = off; CTRL-style, as transformers' generate; for decoder-only models the "
        "prompt's tokens count too).",
    )
    no_repeat_ngram_size: NonNegativeInt = Field(
        0,
        description="Never generate an n-gram of this many tokens twice in one sequence (0 = off; "
        "for decoder-only models the prompt counts as part of the sequence).",
    )
    seed: int | None = Field(None, description="Sampling seed; defaults to the recipe seed.")
    batch_size: PositiveInt = Field(32, description="Inputs generated together in one batch.")


class LoraSpec(Strict):
    """LoRA adapter settings (peft)."""

    r: PositiveInt = Field(8, description="LoRA rank.")
    alpha: PositiveFloat = Field(16, description="LoRA scaling alpha.")
    dropout: Fraction = Field(0.05, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default chosen per model family."
    )

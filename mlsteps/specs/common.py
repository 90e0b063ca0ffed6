"""Recipe building blocks shared by several stage kinds.

Every model is strict (``extra="forbid"``) and every field carries a description: the
descriptions feed ``mlsteps schema`` and the recipe reference in the README.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic import Strict as StrictMode
from pydantic_core import PydanticCustomError

# Numbers are strict: YAML's true/false/yes/no/on/off never count as 1/0, text never counts as a
# number, and a float field refuses inf/nan (libraries fail on them much later, with a traceback
# and exit 1). Ints are capped where torch and numpy stop accepting them.
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's (and transformers.set_seed's) seed range is 0..2**32-1


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number", "expected a number, got the boolean {value}", {"value": value}
        )
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)  # 1e3 is an exact whole number; 2.5 stays a float and is refused
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)  # a numpy integer from code that builds a spec
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number", "expected a number, got the boolean {value}", {"value": value}
        )
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        return float(value)  # a numpy float32 from code that builds a spec
    return value


# A whole number, never a boolean or text; every alias below gives it bounds.
Int = Annotated[int, BeforeValidator(_number), StrictMode()]
# The shared float: finite, never a boolean or text (an int is fine).
FiniteFloat = Annotated[float, BeforeValidator(_not_bool), StrictMode(), Field(allow_inf_nan=False)]

PositiveInt = Annotated[Int, Field(gt=0, le=INT64_MAX)]
NonNegativeInt = Annotated[Int, Field(ge=0, le=INT64_MAX)]
Seed = Annotated[Int, Field(ge=0, le=SEED_MAX)]
PositiveFloat = Annotated[FiniteFloat, Field(gt=0)]
NonNegativeFloat = Annotated[FiniteFloat, Field(ge=0)]
Fraction = Annotated[FiniteFloat, Field(ge=0, lt=1)]
Probability = Annotated[FiniteFloat, Field(gt=0, lt=1)]
PositiveFraction = Annotated[FiniteFloat, Field(gt=0, le=1)]
Bool = Annotated[bool, StrictMode()]
# An integer literal (zero_stage) must not take True as 1.
NotBool = BeforeValidator(_not_bool)

# Stage and run names become directory names: keep them to one safe path component.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Stage names also start every override key (stages.NAME.key), which splits on dots: no dots.
STAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# File extensions -> format (the same table as engine/data.py, kept here free of heavy imports).
_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
}  # fmt: skip
# DataSpec.rows: START:END, each an optional (negative) row number or a percent.
_ROWS_RE = re.compile(r"^\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*$")


# A field that does nothing: (dotted key as written, why, how to fix).
Unused = tuple[str, str, str]


class Strict(BaseModel):
    """Base for all recipe models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def _unused(self, names: Iterable[str], why: str, fix: str = "remove it") -> list[Unused]:
        """(key, why, fix) for each of ``names`` the input gave (model_fields_set) with a value
        other than the default. A default value changes nothing either way, and a resolved
        recipe (every field written out) must load again."""
        fields = type(self).model_fields
        return [
            (fields[n].alias or n, why, fix)
            for n in names
            if n in self.model_fields_set
            and getattr(self, n) != fields[n].get_default(call_default_factory=True)
        ]

    def _ignored(self) -> list[Unused]:
        """This model's own fields that do nothing under the values of other fields."""
        return []

    def _invalid(self) -> list[Unused]:
        """This model's own fields whose value cannot work given the other fields: (key, what,
        fix). For checks that need a field's place in the recipe, which a model validator's
        error does not name."""
        return []

    def ignored_fields(self) -> list[Unused]:
        """Every given field, here and in nested models, that does nothing: (dotted key as
        written, why, how to fix). The recipe refuses them: a setting that silently has no
        effect is a misread recipe."""
        return self._walk("_ignored")

    def invalid_fields(self) -> list[Unused]:
        """Every field, here and in nested models, whose value cannot work (see _invalid)."""
        return self._walk("_invalid")

    def _walk(self, hook: str) -> list[Unused]:
        found: list[Unused] = getattr(self, hook)()
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            key = type(self).model_fields[name].alias or name
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, Strict):
                    # A single data source is held as a list of one but written without an index.
                    sub = f"{key}.{i}" if len(items) > 1 else key
                    found += [(f"{sub}.{k}", why, fix) for k, why, fix in item._walk(hook)]
        return found


def unused_without_validation(spec: Any, names: tuple[str, ...] = ()) -> list[Unused]:
    """Fields of a training stage (and its ``train.eval_every_steps``) that do nothing when it
    has no validation rows: no ``validation`` and ``validation_fraction: 0``."""
    if spec.validation is not None or spec.validation_fraction > 0:
        return []
    why = "there are no validation rows (no 'validation', validation_fraction 0)"
    found: list[Unused] = spec._unused(names, why)
    train_fields = ("eval_every_steps", "keep_best", "early_stopping")
    found += [(f"train.{k}", w, f) for k, w, f in spec.train._unused(train_fields, why)]
    return found


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

# Named validation sets (``validation: {web: a.txt, books: b.txt}``): each is evaluated on its
# own and logged as val_<name>_<metric>. The name becomes part of metric names: keep it plain.
SetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")]
NamedValidation = Annotated[dict[SetName, DataSources], Field(min_length=1)]


def _validation_form(value: Any) -> str:
    """Named sets: a mapping whose keys are not DataSpec fields, nor near misses of one (a
    misspelled 'filez' gets "unknown key, did you mean 'files'" rather than a set 'filez')."""
    import difflib

    if isinstance(value, dict):
        fields = list(DataSpec.model_fields)
        if not any(k in fields or difflib.get_close_matches(str(k), fields, 1, 0.8) for k in value):
            return "form[named]"
    return "form[one]"


# A ``validation`` field: one source, a list evaluated together, or named sets. The
# form is decided up front so that an error inside a named set is reported there (a plain union
# would report the first form's complaint: "unknown key '<set name>'").
ValidationSources = Annotated[
    # Tags with brackets: error places leave them out like other pydantic internals.
    Annotated[DataSources, Tag("form[one]")] | Annotated[NamedValidation, Tag("form[named]")],
    Discriminator(_validation_form),
]


def validation_sets(value: Any) -> dict[str, list[DataSpec]]:
    """A ``validation`` field as {set name: sources}; the single, unnamed form has the name ''."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return {"": value if isinstance(value, list) else [value]}


def column_list(value: str | list[str]) -> list[str]:
    """A ``text_column`` field (one name or a list) as a list."""
    return [value] if isinstance(value, str) else list(value)


Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "clearml", "dvclive"]


def _tracker_missing(name: str) -> str | None:
    """Why tracker ``name`` cannot log here (its package is missing), or None. No import."""
    import importlib.util

    modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
    if any(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return f"the {modules[0]} package is not installed"


class KeepBestSpec(Strict):
    """Which validation metric picks the best checkpoint."""

    metric: str = Field(
        "val_loss",
        description="A validation metric as written to metrics.jsonl, e.g. val_loss, "
        "val_perplexity, val_accuracy, val_bleu, val_<set>_loss for a named validation set.",
    )
    mode: Literal["min", "max"] | None = Field(
        None,
        description="min: lower is better, max: higher is better; default min for names with "
        "loss, perplexity, ter or bits_per_byte, else max.",
    )

    @field_validator("metric")
    @classmethod
    def _is_validation_metric(cls, value: str) -> str:
        if not value.startswith("val_"):
            raise ValueError(
                f"{value!r} is not a validation metric: give its val_ name, e.g. 'val_{value}'"
            )
        return value

    def direction(self) -> Literal["min", "max"]:
        """The mode, given or inferred from the metric's name."""
        if self.mode is not None:
            return self.mode
        lower = ("loss", "perplexity", "ter", "bits_per_byte")
        return "min" if any(w in self.metric for w in lower) else "max"


class EarlyStoppingSpec(Strict):
    """Stop training once the validation metric stops improving."""

    patience: PositiveInt = Field(
        3, description="Evaluations without an improvement larger than min_delta before stopping."
    )
    min_delta: NonNegativeFloat = Field(
        0.0, description="The smallest change of the metric that counts as an improvement."
    )


class TrainSpec(Strict):
    """Optimisation settings passed to the transformers Trainer."""

    lr: PositiveFloat = Field(5e-4, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Linear warmup steps.")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    batch_size: PositiveInt = Field(8, description="Per-device batch size (sequences).")
    grad_accum_steps: PositiveInt = Field(1, description="Gradient accumulation steps.")
    max_grad_norm: NonNegativeFloat = Field(
        1.0, description="Gradient clipping norm (0 disables clipping)."
    )
    max_steps: PositiveInt | None = Field(
        None, description="Total optimizer steps; replaces 'epochs' (do not give both)."
    )
    epochs: PositiveFloat = Field(1.0, description="Number of passes over the training data.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' uses bf16 where the hardware supports it, else fp32."
    )
    fused_adamw: Bool = Field(
        True, description="Use fused AdamW where torch provides it (faster optimizer step)."
    )
    compile: Bool = Field(False, description="Wrap the model with torch.compile.")
    gradient_checkpointing: Bool = Field(
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
    group_by_length: Bool = Field(
        True, description="Batch examples of similar length together (less padding)."
    )
    dataloader_workers: NonNegativeInt = Field(0, description="DataLoader worker processes.")
    # Experiment tracking, best checkpoint and early stopping (engine/trackers.py, engine/best.py).
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers the Trainer logs to, one run per stage named "
        "'<recipe>/<stage>' with the stage config as hyperparameters: tensorboard (event files "
        "in <stage>/tensorboard), mlflow (file:<stage>/mlruns unless MLFLOW_TRACKING_URI is "
        "set), wandb, trackio, comet_ml, clearml, dvclive. Default none: nothing logs in or "
        "reaches the network.",
    )
    keep_best: KeepBestSpec | None = Field(
        None,
        description="Keep the checkpoint with the best validation metric through rotation and "
        "make final/ that model (metrics best_step, best_value). Needs validation and "
        "eval_every_steps.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None,
        description="Stop when the keep_best metric (else val_loss, lower is better) has not "
        "improved for 'patience' evaluations. Needs validation and eval_every_steps.",
    )

    def _ignored(self) -> list[Unused]:
        if self.max_steps is None:
            return []
        return self._unused(("epochs",), "max_steps is set and wins", "remove one of them")

    def _invalid(self) -> list[Unused]:
        out: list[Unused] = []
        for i, name in enumerate(self.report_to):
            missing = _tracker_missing(name)
            if missing:
                fix = "pip install 'mlsteps[trackers]' (tensorboard, mlflow) or remove it"
                out.append((f"report_to.{i}", f"{name}: {missing}", fix))
        for key in ("keep_best", "early_stopping"):
            if getattr(self, key) is not None and self.eval_every_steps is None:
                out.append(
                    (
                        key,
                        "needs evaluations during training (only the end is evaluated)",
                        "set train.eval_every_steps",
                    )
                )
        return out


# Families built without a causal mask: they do MLM and classification, never CLM.
ENCODER_ONLY_FAMILIES = ("bert", "roberta", "modernbert")


class ArchSpec(Strict):
    """A model built from scratch from a transformers config (vocab size comes from the tokenizer)."""

    family: Literal["gpt2", "llama", "bert", "roberta", "modernbert", "t5", "bart"] = Field(
        ...,
        description="Model family (transformers config class). For masked-LM pretraining prefer "
        "modernbert (pre-norm, rotary positions): a small bert sits on the token-frequency "
        "plateau for thousands of steps (docs/quickstart.md).",
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
    do_sample: Bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature.")
    top_p: PositiveFraction = Field(1.0, description="Nucleus sampling mass.")
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
    seed: Seed | None = Field(None, description="Sampling seed; defaults to the recipe seed.")
    batch_size: PositiveInt = Field(32, description="Inputs generated together in one batch.")

    def _ignored(self) -> list[Unused]:
        if self.do_sample:
            return []
        return self._unused(
            ("temperature", "top_p", "top_k", "seed"),
            "do_sample is false (greedy or beam decoding)",
            "set do_sample: true, or remove it",
        )


class LoraSpec(Strict):
    """LoRA adapter settings (peft LoraConfig)."""

    r: PositiveInt = Field(8, description="LoRA rank.")
    alpha: PositiveFloat = Field(16, description="LoRA scaling alpha.")
    dropout: Fraction = Field(0.05, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt, or 'all-linear' (every linear layer but the output "
        "head, peft's rule); default chosen per model family.",
    )
    use_dora: Bool = Field(
        False,
        description="DoRA (weight-decomposed LoRA, Liu et al. 2024): a trained magnitude per "
        "output plus a LoRA direction.",
    )
    use_rslora: Bool = Field(
        False,
        description="rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r (Kalajdzievski "
        "2023), so higher ranks keep learning.",
    )

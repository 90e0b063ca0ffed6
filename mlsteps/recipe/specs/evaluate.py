"""Recipe models of the `eval` and `predict` stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.metrics import table
from mlsteps.recipe.specs.base import (
    Bool,
    NonNegativeInt,
    PositiveFraction,
    PositiveInt,
    Seed,
    Strict,
    Unused,
)
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.loading import (
    AttnImplementation,
    ModelDtype,
    attn_field,
    loading_problems,
    model_dtype_field,
)
from mlsteps.recipe.specs.model import GenerationSpec

# Names, families and fitting model kinds come from the one metric table (torch-free).
METRICS = table.NAMES

# Metric families: which columns and option blocks each one reads.
PERPLEXITY = table.family("perplexity")
RESPONSE = table.family("response")
MASKED = table.family("masked")
GENERATION = table.family("generation")
LABELS = table.family("labels")
PREFERENCE = table.family("preference")
# The metrics each model kind can be scored with (the eval stage and `validate` both check it).
FITS: dict[str, frozenset[str]] = {
    kind: table.fitting(kind) for kind in ("clm", "seq2seq", "mlm", "classification")
}

# Metrics whose tokenisation follows target_lang.
LANGUAGE = frozenset(m.name for m in table.TABLE if m.language)


class PerplexitySpec(Strict):
    """How causal-LM perplexity windows the text, also for response_perplexity (docs/metrics.md)."""

    window: PositiveInt | None = Field(
        None,
        description="Tokens per forward pass; default the model's maximum positions, at most 2048.",
    )
    stride: PositiveInt | None = Field(
        None, description="Tokens the window advances; overlap is context only. Default = window."
    )
    mode: Literal["document", "stream"] = Field(
        "document",
        description="document: each row scored from its start (after BOS/EOS if the tokenizer has "
        "one); stream: the corpus joined with EOS as one token stream.",
    )
    mask_seed: Seed = Field(0, description="Seed of the fixed mask for masked-token perplexity.")
    mask_fraction: PositiveFraction = Field(
        0.15,
        description="masked_perplexity: fraction of each chunk's tokens masked at once (at least one).",
    )
    batch_size: PositiveInt = Field(
        8, description="Windows (pseudo-perplexity: masked copies) scored per forward pass."
    )

    @model_validator(mode="after")
    def _stride_fits_window(self) -> PerplexitySpec:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(
                f"stride ({self.stride}) must not exceed window ({self.window}): "
                "tokens between windows would never be scored"
            )
        return self


# Model kinds lm-eval's HF class (lm_eval.models.huggingface.HFLM) can score. A prompted model
# (mlsteps_prompt.json) is refused: lm-eval renders the task's own prompts, so a hard prompt's
# template would be silently dropped, and a soft prompt's virtual tokens shift the logits that
# HFLM slices by input length.
LM_EVAL_KINDS = ("clm", "seq2seq")


class LmEvalSpec(Strict):
    """lm-evaluation-harness tasks run on every model of the eval stage (docs/metrics.md)."""

    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="lm-eval task or group names: its own tasks (hellaswag, ...; their data come "
        "from the hub cache) or the tasks of include_path.",
    )
    include_path: str | None = Field(
        None,
        description="Directory of extra task YAMLs (lm-eval's --include_path); relative paths "
        "start at the working directory. Its files are part of the stage's fingerprint.",
    )
    num_fewshot: NonNegativeInt | None = Field(
        None, description="Few-shot examples per prompt; default: each task's own setting."
    )
    limit: PositiveInt | None = Field(
        None,
        description="At most this many documents per task (lm-eval --limit): for quick checks, "
        "the numbers are then not the task's.",
    )
    apply_chat_template: Bool = Field(
        False, description="Render prompts with each model's chat template (lm-eval's option)."
    )
    batch_size: PositiveInt = Field(
        1, description="Requests per forward pass (lm-eval --batch_size)."
    )
    confirm_run_unsafe_code: Bool = Field(
        False,
        description="Allow tasks that run their own code (lm-eval's confirm_run_unsafe_code).",
    )


class EvalSpec(Strict):
    """Evaluate one or several models on one data set; one row per model in the stage ladder."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("models",)

    kind: Literal["eval"] = Field(..., description="Stage kind.")
    models: list[str] = Field(
        ...,
        min_length=1,
        description="Models to evaluate: earlier stages, local directories, hub ids.",
    )
    data: DataSpec | None = Field(
        None, description="Evaluation rows of `metrics` (lm_eval tasks bring their own data)."
    )
    metrics: list[str] = Field(
        [],  # pydantic copies it per instance
        description=f"Metrics, from: {', '.join(METRICS)}. Needs `data`; an eval stage has "
        "metrics, lm_eval, or both.",
    )
    lm_eval: LmEvalSpec | None = Field(
        None,
        description="lm-evaluation-harness tasks run on every model (causal LMs, LoRA adapters, "
        "seq2seq models; not prompted models): lm-eval's own metric names, filters and task "
        "versions in the ladder.",
    )
    text_column: str = Field(
        "text",
        description="Column scored as bare text by perplexity, masked_perplexity and "
        "pseudo_perplexity.",
    )
    input_column: str = Field(
        "source",
        description="Column fed to the model for generation/classification; also the prompt "
        "response_perplexity conditions on (a prompted model renders its own template instead).",
    )
    reference_column: str | Annotated[list[str], Field(min_length=1)] = Field(
        "target",
        description="Reference column (each cell a string, or a list of strings for several "
        "references), or a list of columns each holding one reference per row "
        "([summary1, summary2]; null cells skipped). Several references: sacrebleu scores "
        "against all of them, ROUGE takes the best reference per example; response_perplexity "
        "scores them given each model's prompt.",
    )
    label_column: str = Field("label", description="Gold label column for accuracy/F1.")
    prompt_column: str = Field(
        "prompt",
        description="preference_accuracy: prompt column (text, or a conversation rendered with "
        "the model's chat template).",
    )
    chosen_column: str = Field("chosen", description="preference_accuracy: preferred answer.")
    rejected_column: str = Field(
        "rejected", description="preference_accuracy: dispreferred answer."
    )
    target_lang: str | None = Field(
        None,
        description="Language of references (e.g. 'en', 'de', 'zh'); picks metric tokenisation.",
    )
    perplexity: PerplexitySpec = Field(
        default_factory=PerplexitySpec, description="Perplexity options."
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Decoding options."
    )
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    trust_remote_code: Bool = Field(False, description="Allow custom model code from the hub.")

    def input_files(self) -> list[Path]:
        """Every file under lm_eval.include_path (task YAMLs, and their data when kept there):
        part of the fingerprint, so an edited task re-runs the stage."""
        if self.lm_eval is None or self.lm_eval.include_path is None:
            return []
        root = Path(self.lm_eval.include_path).expanduser()
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def _invalid(self) -> list[Unused]:
        return loading_problems(self, weights_train=False)

    def _ignored(self) -> list[Unused]:
        chosen = set(self.metrics)
        names = ", ".join(self.metrics)
        out = []

        def unused_without(family: frozenset[str], keys: tuple[str, ...], what: str) -> None:
            if not chosen & family:
                out.extend(self._unused(keys, f"no {what} metric is chosen ({names})"))

        unused_without(PERPLEXITY | MASKED, ("text_column",), "text perplexity")
        unused_without(PERPLEXITY | MASKED | RESPONSE, ("perplexity",), "perplexity")
        unused_without(GENERATION | LABELS | RESPONSE, ("input_column",), "generation or label")
        unused_without(GENERATION | RESPONSE, ("reference_column",), "generation")
        unused_without(LABELS, ("label_column",), "label (accuracy, f1)")
        unused_without(LANGUAGE, ("target_lang",), "language-dependent (bleu, ter, rouge)")
        unused_without(
            GENERATION | LABELS | PREFERENCE, ("generation",), "generation, label or preference"
        )
        gen, ppl = self.generation, self.perplexity
        if chosen & (LABELS | PREFERENCE) and not chosen & GENERATION:
            why = (
                f"no generation metric is chosen ({names}); labels and preference pairs use "
                "only batch_size"
            )
            found = gen._unused(sorted(set(type(gen).model_fields) - {"batch_size"}), why)
            out += [(f"generation.{k}", w, f) for k, w, f in found]
        if chosen & (PERPLEXITY | MASKED | RESPONSE):
            found = []
            if not chosen & PERPLEXITY:
                found += ppl._unused(("mode",), "only the perplexity metric reads it")
            if not chosen & (PERPLEXITY | RESPONSE):
                found += ppl._unused(("stride",), "only perplexity and response_perplexity read it")
            if "masked_perplexity" not in chosen:
                found += ppl._unused(
                    ("mask_seed", "mask_fraction"), "only masked_perplexity reads it"
                )
            out += [(f"perplexity.{k}", w, f) for k, w, f in found]
        return out

    @model_validator(mode="after")
    def _something_to_score(self) -> EvalSpec:
        if not self.metrics and self.lm_eval is None:
            raise ValueError("an eval stage needs 'metrics' (with 'data') or 'lm_eval'")
        if self.metrics and self.data is None:
            raise ValueError("'metrics' are computed on 'data': set data, or drop metrics")
        if self.data is not None and not self.metrics:
            raise ValueError("'data' is read only by 'metrics' (lm_eval tasks bring their own)")
        return self

    @model_validator(mode="after")
    def _distinct_reference_columns(self) -> EvalSpec:
        cols = self.reference_column
        if isinstance(cols, list) and len(set(cols)) != len(cols):
            dup = next(c for c in cols if cols.count(c) > 1)
            raise ValueError(f"reference_column lists '{dup}' twice")
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> EvalSpec:
        from mlsteps.errors import did_you_mean

        for i, name in enumerate(self.metrics):
            if name not in METRICS:
                hint = did_you_mean(name, METRICS) or f"choose from {', '.join(METRICS)}"
                raise ValueError(f"unknown metric '{name}' at metrics.{i}; {hint}")
        # A changed value, not a set field: the resolved recipe.yaml writes every default.
        pair_columns = ("prompt_column", "chosen_column", "rejected_column")
        fields = type(self).model_fields
        unused = [c for c in pair_columns if getattr(self, c) != fields[c].default]
        if unused and "preference_accuracy" not in self.metrics:
            raise ValueError(f"'{unused[0]}' only applies to the metric preference_accuracy")
        return self

    @model_validator(mode="after")
    def _builtin_columns(self) -> EvalSpec:
        """Builtin data's columns are known without loading it, so `validate` checks them."""
        from mlsteps.builtin import list_builtin

        if self.data is None:
            return self
        info = next((i for i in list_builtin() if i.name == self.data.builtin), None)
        if info is None:
            return self  # not builtin data, or an unknown set (check_data_files names it)
        chosen = set(self.metrics)
        wanted = [
            ("text_column", self.text_column, chosen & (PERPLEXITY | MASKED)),
            ("reference_column", self.reference_column, chosen & (GENERATION | RESPONSE)),
            ("label_column", self.label_column, chosen & LABELS),
            # prompt_column is optional: conversation pairs are split at their last shared turn.
            ("chosen_column", self.chosen_column, chosen & PREFERENCE),
            ("rejected_column", self.rejected_column, chosen & PREFERENCE),
        ]
        for option, columns, needing in wanted:
            names = [columns] if isinstance(columns, str) else columns  # reference_column: a list
            column = next((c for c in names if c not in info.columns), None)
            if needing and column is not None:
                raise ValueError(
                    f"column '{column}' not found in builtin:{info.name}, which has columns: "
                    f"{', '.join(info.columns)}; set {option} (read by "
                    f"{', '.join(sorted(needing))}) to one of them"
                )
        return self


class PredictSpec(Strict):
    """Generate outputs for every row with batched decoding; written in input order."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("model",)

    kind: Literal["predict"] = Field(..., description="Stage kind.")
    model: str = Field(..., description="Model: earlier stage, local directory or hub id.")
    data: DataSpec = Field(..., description="Input rows.")
    input_column: str = Field("source", description="Column fed to the model.")
    reference_column: str | None = Field(
        None, description="Optional reference column copied next to each prediction."
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Decoding options."
    )
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    trust_remote_code: Bool = Field(False, description="Allow custom model code from the hub.")

    def _invalid(self) -> list[Unused]:
        return loading_problems(self, weights_train=False)

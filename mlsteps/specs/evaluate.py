"""Recipe models of the `eval` and `predict` stages."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.specs.common import DataSpec, GenerationSpec, PositiveInt, Strict

METRICS = (
    "perplexity",
    "masked_perplexity",
    "pseudo_perplexity",
    "bleu",
    "chrf",
    "ter",
    "rouge",
    "accuracy",
    "f1",
    "exact_match",
    "token_f1",
    "preference_accuracy",
)


class PerplexitySpec(Strict):
    """How causal-LM perplexity windows the text (see the metric conventions in the README)."""

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
    mask_seed: int = Field(0, description="Seed of the fixed mask for masked-token perplexity.")
    mask_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
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


class EvalSpec(Strict):
    """Evaluate one or several models on one data set; one row per model in the stage ladder."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("models",)

    kind: Literal["eval"] = Field(..., description="Stage kind.")
    models: list[str] = Field(
        ...,
        min_length=1,
        description="Models to evaluate: earlier stages, local directories, hub ids.",
    )
    data: DataSpec = Field(..., description="Evaluation rows.")
    metrics: list[str] = Field(
        ..., min_length=1, description=f"Metrics, from: {', '.join(METRICS)}."
    )
    text_column: str = Field("text", description="Column scored by perplexity metrics.")
    input_column: str = Field(
        "source", description="Column fed to the model for generation/classification."
    )
    reference_column: str = Field(
        "target",
        description="Reference column (string, or list of strings for several references).",
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
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")

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
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")

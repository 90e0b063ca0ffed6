"""Recipe model of the `pretrain` stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import Bool, Fraction, PositiveInt, Probability, Strict, Unused
from mlsteps.recipe.specs.data import DataSources, column_list
from mlsteps.recipe.specs.loading import (
    AttnImplementation,
    ModelDtype,
    attn_field,
    loading_problems,
    model_dtype_field,
)
from mlsteps.recipe.specs.model import ENCODER_ONLY_FAMILIES, ArchSpec
from mlsteps.recipe.specs.train import TrainSpec
from mlsteps.recipe.specs.validation import ValidationSources, unused_without_validation


class PretrainSpec(Strict):
    """Causal-LM or masked-LM pretraining, from scratch or continued."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("from_", "tokenizer")

    kind: Literal["pretrain"] = Field(..., description="Stage kind.")
    objective: Literal["clm", "mlm"] = Field(
        "clm", description="clm: predict the next token; mlm: predict masked tokens."
    )
    from_: str | None = Field(
        None,
        alias="from",
        description="Continue pretraining this model (earlier stage, local directory or hub id).",
    )
    model: ArchSpec | None = Field(
        None, description="Build a new model from this architecture (when not 'from')."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer source (earlier stage, local directory or hub id); defaults to "
        "the one saved with 'from'.",
    )
    data: DataSources = Field(
        ...,
        description="Training text: one data source, or a list of sources trained on together "
        "(e.g. [builtin:toy/corpus, {builtin: toy/translate}]).",
    )
    validation: ValidationSources | None = Field(
        None,
        description="Validation text, one source or a list (else a held-out fraction of "
        "'data'); or a mapping name -> source(s), e.g. {web: a.txt, books: b.txt}: each set is "
        "evaluated on its own and logged as val_<name>_loss, val_<name>_perplexity, ...",
    )
    validation_fraction: Fraction = Field(
        0.05,
        description="Fraction of documents held out for validation when 'validation' is unset.",
    )
    text_column: str | list[str] = Field(
        "text",
        description="Column(s) holding the text; with a list, every listed column a source has "
        "is used, each row of each column one document (e.g. [text, source, target]).",
    )
    max_seq_len: PositiveInt = Field(128, description="Tokens per packed training block.")
    keep_remainder: Bool = Field(
        False,
        description="Keep the last, shorter block of the packed stream instead of dropping it.",
    )
    mlm_probability: Probability = Field(
        0.15, description="Fraction of tokens selected for masking (80/10/10 rule)."
    )
    whole_word_mask: Bool = Field(False, description="Mask whole words instead of single tokens.")
    freeze_unseen_tokens: Bool = Field(
        True,
        description="Keep the embeddings of token ids that never occur in the training text "
        "(special tokens excepted) where they start. Otherwise, under Adam, they all drift into "
        "one shared direction, and a later stage that needs them (a template's ':' or newline, "
        "the other language of a translation) starts worse than from a random model. The cost: "
        "held-out text full of tokens the training text lacks scores a worse perplexity early "
        "on, since those tokens keep their untrained logits.",
    )
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    trust_remote_code: Bool = Field(
        False, description="Allow custom model code from a hub repository (security risk)."
    )
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")

    @property
    def text_columns(self) -> list[str]:
        """``text_column`` as a list."""
        return column_list(self.text_column)

    def _ignored(self) -> list[Unused]:
        out = []
        if self.objective == "clm":
            out += self._unused(
                ("mlm_probability", "whole_word_mask"),
                "objective is clm (masking is for mlm)",
                "remove it, or set objective: mlm",
            )
        if self.validation is not None:
            out += self._unused(("validation_fraction",), "'validation' is given")
        return out + unused_without_validation(self)

    def _invalid(self) -> list[Unused]:
        out: list[Unused] = []
        streamed = [i for i, d in enumerate(self.data) if d.streaming]
        if streamed and self.validation is None and self.validation_fraction > 0:
            key = f"data.{streamed[0]}.streaming" if len(self.data) > 1 else "data.streaming"
            what = "a streamed corpus has no row count to hold out validation_fraction from"
            fix = "give 'validation' (it may be streamed too), or validation_fraction: 0"
            out.append((key, what, fix))
        return out + loading_problems(self, weights_train=True)

    @model_validator(mode="after")
    def _model_source(self) -> PretrainSpec:
        if (self.from_ is None) == (self.model is None):
            raise ValueError("give exactly one of 'from' (continue a model) or 'model' (new model)")
        if self.model is not None and self.tokenizer is None:
            raise ValueError(
                "a new model needs a 'tokenizer' (a tokenizer stage, directory or hub id)"
            )
        if self.model is not None:
            encoder_only = self.model.family in ENCODER_ONLY_FAMILIES
            if self.objective == "clm" and encoder_only:
                raise ValueError(
                    f"objective clm needs a decoder family (gpt2, llama), not {self.model.family}"
                )
            if self.objective == "mlm" and not encoder_only:
                raise ValueError(
                    f"objective mlm needs an encoder family (bert, roberta), not {self.model.family}"
                )
            if self.max_seq_len > self.model.max_positions:
                raise ValueError(
                    f"max_seq_len {self.max_seq_len} exceeds model.max_positions "
                    f"{self.model.max_positions}"
                )
        return self

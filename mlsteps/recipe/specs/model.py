"""The model a stage builds, adapts and decodes with: ``arch:`` (a new model from a config),
``lora:`` (peft adapters) and ``generation:`` (decoding settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import (
    Bool,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
    Seed,
    Strict,
    Unused,
)

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

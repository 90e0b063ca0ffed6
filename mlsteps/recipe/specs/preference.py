"""Recipe model of the `preference` stage (DPO, ORPO, KTO, SimPO on TRL's trainers)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import Fraction, PositiveInt, Strict, Unused
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.loading import (
    AttnImplementation,
    ModelDtype,
    attn_field,
    loading_problems,
    model_dtype_field,
)
from mlsteps.recipe.specs.model import LoraSpec
from mlsteps.recipe.specs.train import TrainSpec

# Finite, positive, and a real number: YAML `true` is not a beta.
FinitePositive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
FiniteNonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]

METHODS = ("dpo", "orpo", "kto", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
# DPOTrainer's loss types that compare a chosen and a rejected answer against the reference.
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
NO_REFERENCE = "none"


class PreferenceSpec(Strict):
    """Preference tuning after SFT: dpo (TRL DPOTrainer), orpo (ORPOTrainer), kto (KTOTrainer),
    simpo (CPOTrainer with the SimPO loss); full or LoRA."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("from_", "tokenizer", "reference")

    kind: Literal["preference"] = Field(..., description="Stage kind.")
    method: Literal["dpo", "orpo", "kto", "simpo"] = Field(
        ...,
        description="dpo (pairs, against a frozen reference), orpo and simpo (pairs, "
        "reference-free), kto (unpaired prompt/completion/label rows, against a reference).",
    )
    from_: str = Field(
        ...,
        alias="from",
        description="The causal LM to tune: an earlier stage (e.g. the SFT stage), a local "
        "directory or a hub id.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer source; defaults to the one saved with 'from'."
    )
    reference: str | None = Field(
        None,
        description="dpo/kto: the frozen reference model; default the 'from' model (with LoRA: "
        "the base, adapter disabled). orpo/simpo are reference-free: leave unset or 'none'.",
    )
    data: DataSpec = Field(..., description="Training rows.")
    validation: DataSpec | None = Field(
        None, description="Validation rows (else a held-out fraction)."
    )
    validation_fraction: Fraction = Field(
        0.05, description="Fraction held out for validation when 'validation' is unset."
    )
    prompt_column: str = Field(
        "prompt",
        description="Prompt column: text, or a conversation (list of {role, content}) to which "
        "the tokenizer's chat template is applied.",
    )
    chosen_column: str = Field(
        "chosen", description="dpo/orpo/simpo: the preferred answer (text or assistant turns)."
    )
    rejected_column: str = Field("rejected", description="dpo/orpo/simpo: the dispreferred answer.")
    completion_column: str = Field("completion", description="kto: the answer column.")
    label_column: str = Field(
        "label", description="kto: true (desirable) or false (undesirable) per row."
    )
    beta: FinitePositive = Field(
        0.1,
        description="dpo/kto/simpo: strength of the implicit reward (dpo: deviation from the "
        "reference; simpo: reward scale); orpo: weight of the odds-ratio term (lambda).",
    )
    loss_type: str | None = Field(
        None,
        description=f"dpo only: a DPOTrainer loss type ({', '.join(DPO_LOSSES)}); default "
        "sigmoid (the DPO paper).",
    )
    sft_weight: FiniteNonNegative | None = Field(
        None,
        description="dpo only: add TRL's 'sft' loss (the NLL of the chosen answer) with this "
        "weight next to the preference loss (RPO, Pang et al. 2024); keeps the likelihood of "
        "good answers from falling while their margin grows.",
    )
    simpo_gamma: FiniteNonNegative | None = Field(
        None, description="simpo only: target reward margin (default 0.5)."
    )
    chat_template: str | None = Field(
        None,
        description="For conversational data: a Jinja chat template or a builtin name "
        "(chatml); default the template already in the tokenizer. Saved with final/.",
    )
    max_seq_len: PositiveInt = Field(
        512, description="Truncation length of prompt + answer, in tokens."
    )
    tuning: Literal["full", "lora"] = Field(
        "full", description="Train all weights or a LoRA adapter."
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings (tuning: lora).")
    merge: bool = Field(
        False, description="lora: write a merged plain model to final/ instead of the adapter."
    )
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(lr=5e-6, batch_size=8),
        description="Optimisation settings (default lr 5e-6: preference tuning moves a tuned "
        "model only a little).",
    )

    def _invalid(self) -> list[Unused]:
        return loading_problems(self, weights_train=self.tuning == "full")

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceSpec:
        method = self.method
        if method in REFERENCE_FREE and self.reference not in (None, NO_REFERENCE):
            raise ValueError(
                f"method {method} is reference-free: remove 'reference' (or set it to 'none')"
            )
        if method not in REFERENCE_FREE and self.reference == NO_REFERENCE:
            raise ValueError(
                f"method {method} needs a reference model; remove 'reference: none' to use the "
                "frozen 'from' model, or use orpo/simpo (reference-free)"
            )
        if self.loss_type is not None:
            if method != "dpo":
                raise ValueError("'loss_type' only applies to method dpo")
            if self.loss_type not in DPO_LOSSES:
                from mlsteps.errors import did_you_mean

                hint = did_you_mean(self.loss_type, DPO_LOSSES) or f"one of {', '.join(DPO_LOSSES)}"
                raise ValueError(f"unknown dpo loss_type '{self.loss_type}'; {hint}")
        if self.sft_weight is not None and method != "dpo":
            raise ValueError("'sft_weight' only applies to method dpo")
        if self.simpo_gamma is not None and method != "simpo":
            raise ValueError("'simpo_gamma' only applies to method simpo")
        if self.lora is not None and self.tuning != "lora":
            raise ValueError("'lora' settings only apply to tuning: lora")
        if self.merge and self.tuning != "lora":
            raise ValueError("'merge' only applies to tuning: lora")
        if self.chat_template is not None:
            from mlsteps.engine.chat_data import check_template_text

            check_template_text(self.chat_template)
        kto_cols = ("completion_column", "label_column")
        pair_cols = ("chosen_column", "rejected_column")
        unused = pair_cols if method == "kto" else kto_cols
        for name in unused:
            # A changed value, not a set field: the resolved recipe.yaml writes every default.
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"'{name}' does not apply to method {method}")
        return self

    @property
    def reference_source(self) -> str | None:
        """The reference model named in the recipe (None: the 'from' model or reference-free)."""
        return None if self.reference in (None, NO_REFERENCE) else self.reference

    @property
    def lora_spec(self) -> LoraSpec:
        """LoRA settings, defaults filled in."""
        return self.lora or LoraSpec()

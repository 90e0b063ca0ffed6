"""Recipe model of the `prompt` stage."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mlsteps.recipe.specs.base import Bool, Fraction, PositiveInt, Strict, Unused
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.loading import (
    AttnImplementation,
    ModelDtype,
    attn_field,
    loading_problems,
    model_dtype_field,
)
from mlsteps.recipe.specs.train import TrainSpec
from mlsteps.recipe.specs.validation import (
    VALIDATION_NAMED,
    ValidationRows,
    unused_without_validation,
)

# The default of hard prompts (zero_shot, few_shot) for classification; chosen by the measured
# ladder in BENCHMARKS.md ("Low-label ladder").
DEFAULT_HARD_CALIBRATION = "contextual"


class PromptSpec(Strict):
    """Prompt learning: templates, few-shot demonstrations, or soft prompts trained with peft."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("from_",)

    kind: Literal["prompt"] = Field(..., description="Stage kind.")
    method: Literal["zero_shot", "few_shot", "prompt_tuning", "prefix_tuning", "p_tuning"] = Field(
        ..., description="Hard prompts (zero_shot, few_shot) or soft prompts (the tuning methods)."
    )
    from_: str = Field(
        ..., alias="from", description="Model to prompt (earlier stage, local directory or hub id)."
    )
    task: Literal["generation", "classification"] = Field(
        "generation",
        description="generation: free text; classification: score verbalizer words by likelihood.",
    )
    template: str = Field(
        "{input}",
        description="Prompt template over row columns: Python format fields ('{source}') or "
        "Jinja2 ('{{ source }}').",
    )
    template_format: Literal["auto", "format", "jinja"] = Field(
        "auto", description="Template syntax; 'auto' detects Jinja2 by '{{' or '{%'."
    )
    target_column: str = Field("target", description="Column with the expected output / label.")
    data: DataSpec | None = Field(
        None, description="Training rows: demonstrations (few_shot) or soft-prompt training data."
    )
    validation: ValidationRows | None = Field(
        None, description="Validation rows for soft-prompt training" + VALIDATION_NAMED + "."
    )
    validation_fraction: Fraction = Field(
        0.1, description="Held-out fraction when no 'validation'."
    )
    shots: PositiveInt = Field(4, description="few_shot: number of demonstrations.")
    demo_separator: str = Field("\n\n", description="few_shot: text between demonstrations.")
    answer_separator: str = Field(
        " ", description="Text between a rendered prompt and its answer in demonstrations/training."
    )
    per_example: Bool = Field(
        False, description="few_shot: draw different demonstrations for every row (seeded)."
    )
    verbalizer: dict[str, str] | None = Field(
        None,
        description="classification: label -> word scored by the model, e.g. {1: great, 0: bad}.",
    )
    calibration: Literal["none", "contextual", "domain_pmi"] | None = Field(
        None,
        description="classification: correct the verbalizer scores for the prompt's own bias "
        "towards a label word. contextual (Zhao et al. 2021): divide p(label|input) by the mean "
        "label distribution given content-free inputs ('N/A', '', '[MASK]') in the same prompt; "
        "domain_pmi (Holtzman et al. 2021): divide by p(label|the template's text after its "
        "last field); none: raw scores. Unset: contextual for zero_shot/few_shot (measured best, "
        "see BENCHMARKS.md), none for soft prompts, which are trained through the verbalizer.",
    )
    num_virtual_tokens: PositiveInt = Field(20, description="Soft prompt length in tokens.")
    init_text: str | None = Field(
        None,
        description="prompt_tuning: initialise virtual tokens from the embeddings of this text "
        "(repeated/cut to num_virtual_tokens); else from randomly sampled vocabulary embeddings.",
    )
    chat: Bool | None = Field(
        None,
        description="zero_shot/few_shot of a causal LM: render prompts as chat turns through the "
        "model's chat template (each demonstration a user turn and the assistant's reply, the "
        "row the last user turn, then the template's generation prompt). Unset: when the "
        "model's tokenizer has a chat template; false: plain text prompts.",
    )
    max_seq_len: PositiveInt = Field(256, description="Truncation length of prompt + answer.")
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    trust_remote_code: Bool = Field(False, description="Allow custom model code from the hub.")
    preview_rows: PositiveInt = Field(
        5,
        description="Rows whose rendered prompts (and model outputs) go to prompts_preview.jsonl.",
    )
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec.model_validate({"lr": 3e-2}),
        description="Soft-prompt optimisation settings; lr defaults to 3e-2 here.",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _soft_prompt_lr(cls, value: Any) -> Any:
        # A partial `train:` block (or recipe defaults) must keep the soft-prompt learning rate,
        # not fall back to TrainSpec's full-model default (5e-4 barely moves a soft prompt).
        if isinstance(value, dict) and "lr" not in value:
            return {**value, "lr": 3e-2}
        return value

    @field_validator("verbalizer", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        # YAML reads `{1: great}` with an int key; labels are matched as text (str(label)).
        if isinstance(value, dict):
            return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}
        return value

    def _ignored(self) -> list[Unused]:
        out = []
        if self.method in ("zero_shot", "few_shot"):
            out += self._unused(
                (
                    "validation",
                    "validation_fraction",
                    "num_virtual_tokens",
                    "max_seq_len",
                    "train",
                    "model_dtype",
                    "attn_implementation",
                ),  # fmt: skip
                f"method {self.method} trains nothing (these are for soft prompts)",
                "remove it, or use a tuning method",
            )
        else:
            out += self._unused(("chat",), f"method {self.method} trains on plain text prompts")
            if self.validation is not None:
                out += self._unused(("validation_fraction",), "'validation' is given")
            out += unused_without_validation(self)
        if self.method != "few_shot":
            out += self._unused(
                ("shots", "demo_separator"), f"method {self.method} shows no demonstrations"
            )
        return out

    def _invalid(self) -> list[Unused]:
        return loading_problems(self, weights_train=False)

    @property
    def resolved_calibration(self) -> str:
        """The calibration in force: the field, else the method's default (see its description)."""
        if self.calibration is not None:
            return self.calibration
        if self.task != "classification" or self.method not in ("zero_shot", "few_shot"):
            return "none"
        return DEFAULT_HARD_CALIBRATION

    @model_validator(mode="after")
    def _needs_data(self) -> PromptSpec:
        if self.method != "zero_shot" and self.data is None:
            raise ValueError(f"method {self.method} needs 'data' (demonstrations or training rows)")
        if self.task == "classification" and not self.verbalizer:
            raise ValueError("task classification needs a 'verbalizer' mapping labels to words")
        if self.verbalizer and self.task != "classification":
            raise ValueError("'verbalizer' only applies to task: classification")
        if self.calibration is not None and self.task != "classification":
            raise ValueError("'calibration' only applies to task: classification")
        if self.per_example and self.method != "few_shot":
            raise ValueError("'per_example' only applies to method: few_shot")
        if self.init_text is not None and self.method != "prompt_tuning":
            raise ValueError("'init_text' only applies to method: prompt_tuning")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("'init_text' is empty; remove it for a random initialisation")
        return self

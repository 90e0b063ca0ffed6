"""Recipe model of the `finetune` stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mlsteps.recipe.specs.base import Bool, Fraction, PositiveInt, Strict, Unused
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.loading import (
    QUANT_DESCRIPTION,
    AttnImplementation,
    ModelDtype,
    QuantizationSpec,
    attn_field,
    loading_problems,
    model_dtype_field,
)
from mlsteps.recipe.specs.model import ArchSpec, GenerationSpec, LoraSpec
from mlsteps.recipe.specs.train import TrainSpec
from mlsteps.recipe.specs.validation import (
    VALIDATION_NAMED,
    ValidationRows,
    unused_without_validation,
)


def template_fields(template: str, template_format: str = "auto") -> list[str]:
    """Column names a template reads, in order, without duplicates (ValueError if malformed):
    the one template language of mlsteps/templates.py, shared with the prompt stage."""
    from mlsteps.templates import TemplateError
    from mlsteps.templates import template_fields as fields

    try:
        return fields(template, template_format)
    except TemplateError as exc:
        raise ValueError(f"template: {exc}" + (f"; {exc.hint}" if exc.hint else "")) from None


_TASK_FIELDS = {
    "classification": ("text_column", "text_pair_column", "label_column", "class_weights",
                       "max_seq_len"),
    "seq2seq": ("source_column", "target_column", "source_prefix", "max_source_len",
                "max_target_len", "generation", "target_lang", "validation_max_samples"),
    "causal_lm": ("prompt_column", "response_column", "template", "template_format", "packing",
                  "max_seq_len",
                  "generation", "target_lang", "validation_max_samples"),
    "chat": ("messages_column", "chat_template", "packing", "max_seq_len", "generation",
             "target_lang", "validation_max_samples"),
}  # fmt: skip
# Fields that only some tasks read; under any other task they would silently do nothing.
_NOT_FOR_TASK = {
    task: tuple(
        sorted({f for fields in _TASK_FIELDS.values() for f in fields} - set(_TASK_FIELDS[task]))
    )
    for task in _TASK_FIELDS
}


class FinetuneSpec(Strict):
    """Adapt a model to a task: classification, seq2seq or instruction SFT; full or LoRA."""

    REF_FIELDS: ClassVar[tuple[str, ...]] = ("from_", "tokenizer")

    kind: Literal["finetune"] = Field(..., description="Stage kind.")
    task: Literal["classification", "seq2seq", "causal_lm", "chat"] = Field(
        ...,
        description="classification, seq2seq (translation/summarization), causal_lm (SFT) or "
        "chat (SFT on conversations through a chat template, loss on assistant turns).",
    )
    from_: str | None = Field(
        None,
        alias="from",
        description="Start from this model (earlier stage, local directory or hub id).",
    )
    model: ArchSpec | None = Field(
        None, description="Build a new model from this architecture instead of 'from'."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer source; defaults to the one saved with 'from'."
    )
    data: DataSpec = Field(..., description="Training rows.")
    validation: ValidationRows | None = Field(
        None, description="Validation rows (else a held-out fraction)" + VALIDATION_NAMED + "."
    )
    validation_fraction: Fraction = Field(
        0.1, description="Fraction held out for validation when 'validation' is unset."
    )
    text_column: str = Field("text", description="classification: the text column.")
    text_pair_column: str | None = Field(None, description="classification: optional second text.")
    label_column: str = Field(
        "label", description="classification: label column (ints or strings)."
    )
    class_weights: Bool = Field(
        False, description="classification: weight the loss by inverse class frequency."
    )
    source_column: str = Field("source", description="seq2seq: input column.")
    target_column: str = Field(
        "target",
        description="seq2seq: output column (a list of references: training uses the first, "
        "validation scores against all).",
    )
    source_prefix: str = Field("", description="seq2seq: text put before every source (t5 style).")
    prompt_column: str = Field("prompt", description="causal_lm: instruction/prompt column.")
    response_column: str = Field(
        "response",
        description="causal_lm: response column (a list: training uses the first item, "
        "validation scores against all).",
    )
    template: str | None = Field(
        None,
        description="causal_lm: prompt built from row columns, in the prompt stage's template "
        "language: each {column} is replaced by that column's text, e.g. "
        "'Translate: {source}\\nAnswer: ' (list-valued columns joined with spaces), or Jinja2 "
        "('{{ source }}'). The response (+ EOS) is appended; trailing spaces move to the "
        "response side. Saved into final/'s mlsteps_prompt.json for eval and predict.",
    )
    template_format: Literal["auto", "format", "jinja"] = Field(
        "auto",
        description="causal_lm: template syntax; 'auto' detects Jinja2 by '{{' or '{%'. Set "
        "format to write literal braces as {{ and }} (docs/templates.md).",
    )
    messages_column: str = Field(
        "messages",
        description="chat: the conversation column, a list of {role, content} turns (ShareGPT "
        "{from, value} accepted).",
    )
    chat_template: str | None = Field(
        None,
        description="chat: a Jinja chat template or a builtin name (chatml); default the "
        "template already in the tokenizer. Saved into final/'s tokenizer, so "
        "apply_chat_template, pipelines, vLLM and lm-eval reproduce the training prompts.",
    )
    packing: Bool = Field(
        False, description="causal_lm/chat: pack several examples into one sequence."
    )
    max_seq_len: PositiveInt = Field(
        256,
        description="Truncation length (classification, causal_lm); if left unset it shrinks "
        "to the model's position limit.",
    )
    max_source_len: PositiveInt = Field(256, description="seq2seq: source truncation length.")
    max_target_len: PositiveInt = Field(128, description="seq2seq: target truncation length.")
    method: Literal["full", "lora"] = Field(
        "full", description="Train all weights or a LoRA adapter."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (method: lora).")
    merge: Bool = Field(
        False, description="lora: write a merged plain model to final/ instead of the adapter."
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Decoding used for validation by generation."
    )
    target_lang: str | None = Field(
        None, description="Language of targets (e.g. 'zh'); picks BLEU/ROUGE tokenisation."
    )
    validation_max_samples: PositiveInt | None = Field(
        200,
        description="Generate for at most N validation rows (generation is slow); null: all.",
    )
    model_dtype: ModelDtype = model_dtype_field()
    attn_implementation: AttnImplementation | None = attn_field()
    quantization: QuantizationSpec | None = Field(None, description=QUANT_DESCRIPTION)
    trust_remote_code: Bool = Field(False, description="Allow custom model code from the hub.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")

    def _ignored(self) -> list[Unused]:
        task = self.task
        out = []
        for name in _NOT_FOR_TASK[task]:
            users = " or ".join(t for t, fields in _TASK_FIELDS.items() if name in fields)
            out += self._unused((name,), f"task is {task}", f"remove it; it is for task {users}")
        if task == "causal_lm" and self.template is not None:
            out += self._unused(("prompt_column",), "'template' builds the prompt", "remove it")
        if self.method == "full":
            out += self._unused(("lora",), "method is full", "remove it, or set method: lora")
        if self.validation is not None:
            out += self._unused(("validation_fraction",), "'validation' is given")
        generated = ("generation", "target_lang", "validation_max_samples")
        return out + unused_without_validation(self, generated)

    def _invalid(self) -> list[Unused]:
        out = loading_problems(self, weights_train=self.method == "full")
        if self.quantization is not None and self.method != "lora":
            out.append(
                (
                    "quantization",
                    "k-bit weights cannot be trained; QLoRA trains a LoRA adapter on the frozen "
                    "quantized base",
                    "set method: lora, or remove it",
                )
            )
        if self.quantization is not None and self.merge:
            out.append(
                (
                    "merge",
                    "merging into a k-bit base rounds the adapter away",
                    "keep the adapter (merge: false) and merge it onto the full-precision base "
                    "later",
                )
            )
        return out

    @model_validator(mode="after")
    def _model_source(self) -> FinetuneSpec:
        if (self.from_ is None) == (self.model is None):
            raise ValueError(
                "give exactly one of 'from' (a pretrained model) or 'model' (new model)"
            )
        if self.model is not None and self.tokenizer is None:
            raise ValueError("a new model needs a 'tokenizer'")
        if (
            self.model is not None
            and self.task == "seq2seq"
            and self.model.family not in ("t5", "bart")
        ):
            raise ValueError(
                f"task seq2seq needs an encoder-decoder family (t5, bart), not {self.model.family}"
            )
        if self.method == "lora" and self.from_ is None:
            raise ValueError(
                "method lora adapts a pretrained model: give 'from' (LoRA on a new, random model "
                "would freeze random weights)"
            )
        if self.template is not None:
            if self.task != "causal_lm":
                raise ValueError("'template' only applies to task causal_lm")
            if not template_fields(self.template, self.template_format):
                raise ValueError(
                    "'template' names no column, e.g. 'Question: {question}\\nAnswer: '"
                )
        if self.merge and self.method != "lora":
            raise ValueError("'merge' only applies to method: lora")
        if self.chat_template is not None:
            from mlsteps.engine.chat_data import check_template_text

            check_template_text(self.chat_template)
        return self

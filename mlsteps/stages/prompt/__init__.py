"""The `prompt` stage: hard prompts (zero_shot, few_shot) or soft prompts trained with peft.

final/ is a *prompted model* (see :mod:`mlsteps.prompt.prompter`): ``mlsteps_prompt.json`` (template,
demonstrations, separators, verbalizer, base model reference) + the tokenizer, and for soft
prompts the peft adapter (loadable with ``PeftModel.from_pretrained(base, final)``).
Every input problem is a UserError raised before anything is written.

Here: the prompter, the base model's kind and tokenizer, the demonstrations. The rows are
``data.py``'s, a hard prompt's results ``hard.py``'s, soft-prompt training ``soft.py``'s; the
prompt machinery they share with eval and predict is the top-level ``mlsteps.prompt`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.distributed import main_process_first
from mlsteps.errors import UserError, field_scope
from mlsteps.prompt.prompter import (
    PROMPT_FILE,
    SOFT_METHODS,
    Prompter,
    demonstrations_from_rows,
    select_demonstrations,
    template_fields,
)
from mlsteps.recipe.specs.prompt import PromptSpec
from mlsteps.stages.prompt.data import load_data
from mlsteps.stages.prompt.hard import PREVIEW_FILE, finish_hard
from mlsteps.stages.prompt.soft import train_soft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PREVIEW_FILE", "run"]


@stage_entry
def run(spec: PromptSpec, ctx: StageContext) -> StageResult:
    """Build a prompted model; for soft-prompt methods train it (resuming if interrupted)."""
    source = ctx.resolve_source(spec.from_)
    _check_source(source, spec.from_)
    prompter = _prompter(spec, ctx, source)
    template_fields(spec.template, spec.template_format, field="template")  # syntax
    with main_process_first():  # rank 0 fills the datasets cache; the other ranks reuse it
        rows, val_sets = load_data(spec, ctx, prompter)
    config, kind = _model_kind(spec, source)
    prompter.model_kind = "seq2seq" if kind == "seq2seq" else "causal"
    tokenizer = _tokenizer(spec, ctx, prompter, source, kind)
    if spec.method == "few_shot":
        assert rows is not None
        _set_demonstrations(spec, ctx, prompter, rows)
    preview_source = next(iter(val_sets.values()), None) or rows or []
    if spec.method not in SOFT_METHODS:
        return finish_hard(spec, ctx, prompter, tokenizer, preview_source, config)
    assert rows is not None
    return train_soft(spec, ctx, prompter, tokenizer, rows, val_sets)


def _prompter(spec: PromptSpec, ctx: StageContext, source: str) -> Prompter:
    """The prompted model as the recipe describes it (demonstrations and model kind come later)."""
    return Prompter(
        method=spec.method,
        template=spec.template,
        template_format=spec.template_format,  # type: ignore[arg-type]  # "auto" is resolved
        task=spec.task,
        demo_separator=spec.demo_separator,
        answer_separator=spec.answer_separator,
        per_example=spec.per_example,
        shots=spec.shots if spec.method == "few_shot" else 0,
        seed=ctx.seed,
        verbalizer=spec.verbalizer,
        target_column=spec.target_column,
        base_model=source,
        has_adapter=spec.method in SOFT_METHODS,
        num_virtual_tokens=spec.num_virtual_tokens if spec.method in SOFT_METHODS else 0,
        calibration=spec.resolved_calibration,
    )


def _model_kind(spec: PromptSpec, source: str) -> tuple[Any, str]:
    """The base model's config and kind ('clm' or 'seq2seq'); any other kind is a UserError."""
    from mlsteps.engine.inference import kind_from_config
    from mlsteps.engine.modeling import load_config

    with field_scope("from"):
        config = load_config(source, trust_remote_code=spec.trust_remote_code, shown=spec.from_)
    kind = kind_from_config(config)
    if kind not in ("clm", "seq2seq"):
        raise UserError(
            f"{spec.from_!r} is a {kind or config.model_type} model; prompting needs a causal LM "
            "or a seq2seq model",
            field="from",
        )
    return config, kind


def _tokenizer(
    spec: PromptSpec, ctx: StageContext, prompter: Prompter, source: str, kind: str
) -> Any:
    """The base model's tokenizer, with a pad token; chat turns when the prompts use them; the
    verbalizer's words checked against it."""
    from mlsteps.engine.modeling import ensure_pad_token, load_tokenizer

    with field_scope("from"):
        tokenizer = load_tokenizer(source, trust_remote_code=spec.trust_remote_code)
    ensure_pad_token(tokenizer)
    prompter.chat = _uses_chat(spec, kind, tokenizer)
    if prompter.chat:
        prompter.use_chat_template(tokenizer)
        ctx.log("prompts are chat turns through the model's chat template")
    if spec.verbalizer:
        from mlsteps.prompt.scoring import check_verbalizer

        with field_scope("verbalizer"):
            check_verbalizer(
                tokenizer,
                spec.verbalizer,
                answer_prefix=prompter.answer_prefix,
                seq2seq=kind == "seq2seq",
            )
    return tokenizer


def _set_demonstrations(
    spec: PromptSpec, ctx: StageContext, prompter: Prompter, rows: list[dict[str, Any]]
) -> None:
    """few_shot: the demonstration pool (per_example) or the fixed demonstrations."""
    pool = demonstrations_from_rows(rows, prompter, field="data")
    if spec.per_example:
        prompter.demo_pool = pool
    else:
        prompter.demos = [pool[i] for i in select_demonstrations(len(pool), spec.shots, ctx.seed)]


def _uses_chat(spec: PromptSpec, kind: str | None, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether hard prompts are rendered as chat turns: ``spec.chat``, by default when the
    causal LM's tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.method in SOFT_METHODS or spec.chat is False:
        return False
    if spec.chat and (kind != "clm" or not has_template):
        raise UserError(
            f"chat: true needs a causal LM with a chat template; '{spec.from_}' "
            + (
                "is a seq2seq model"
                if kind != "clm"
                else "is one, but its tokenizer has no chat template"
            ),
            field="chat",
            hint="fine-tune it with task: chat (chat_template: chatml), or remove chat",
        )
    return kind == "clm" and has_template


def _check_source(source: str, ref: str) -> None:
    path = Path(source)
    if (path / PROMPT_FILE).is_file():
        raise UserError(
            f"{ref!r} is already a prompted model; prompt stages do not stack",
            field="from",
            hint="point 'from' at the model that stage prompts",
        )
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"{ref!r} is a peft adapter, not a full model",
            field="from",
            hint="write a merged model in that finetune stage (merge: true)",
        )

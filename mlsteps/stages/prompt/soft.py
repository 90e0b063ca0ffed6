"""Soft prompts (prompt/prefix/p-tuning): the frozen base, the peft wrapper, the training request
(through the verbalizer for classification), and the trained prompted model in final/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlsteps.context import StageContext, StageResult
from mlsteps.errors import UserError
from mlsteps.prompt.prompter import Prompter, prompt_file
from mlsteps.recipe.specs.prompt import PromptSpec
from mlsteps.stages.prompt.hard import prompt_length_metrics, write_preview

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mlsteps.engine.training import TrainRequest

# Rank-classification accuracy during training is computed on at most this many validation rows.
VAL_CLASSIFY_ROWS = 200


def train_soft(
    spec: PromptSpec,
    ctx: StageContext,
    prompter: Prompter,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    val_sets: dict[str, list[dict[str, Any]]],
) -> StageResult:
    from mlsteps.engine.modeling import loaded_metrics
    from mlsteps.engine.training import save_final, train
    from mlsteps.prompt import soft_prompt

    base, max_seq_len = _soft_base(spec, ctx, prompter)
    loaded = loaded_metrics(base, spec)
    model = _wrap_soft(spec, ctx, base, tokenizer)
    trainable, total = soft_prompt.trainable_parameters(model)
    ctx.log(f"{spec.method}: {trainable:,} trainable of {total:,} parameters")
    val_sets = {name: val_rows for name, val_rows in val_sets.items() if val_rows}
    outcome = train(
        _soft_request(spec, ctx, prompter, model, tokenizer, rows, val_sets, max_seq_len)
    )
    preview_rows = (next(iter(val_sets.values()), None) or rows)[: spec.preview_rows]
    preview = write_preview(
        ctx, soft_prompt.preview_records(model, tokenizer, prompter, preview_rows, seed=ctx.seed)
    )
    final = save_final(
        model,
        tokenizer,
        ctx,
        extra_files=prompt_file(prompter, ctx.final_dir),
        state_dict=outcome.full_state_dict,
    )
    metrics: dict[str, Any] = dict(outcome.metrics)
    metrics.update(
        trainable_params=trainable,
        total_params=total,
        num_virtual_tokens=spec.num_virtual_tokens,
        **prompt_length_metrics(prompter, tokenizer, rows),
        **loaded,
    )
    return StageResult(metrics=metrics, outputs={"final": str(final), "preview": str(preview)})


def _soft_base(spec: PromptSpec, ctx: StageContext, prompter: Prompter) -> tuple[Any, int]:
    """The frozen base model and the input length that leaves room for the virtual tokens."""
    from mlsteps.engine.modeling import load_model, loading_kwargs, max_positions

    task = "seq2seq" if prompter.model_kind == "seq2seq" else "clm"
    base = load_model(
        prompter.base_model,
        task,
        trust_remote_code=spec.trust_remote_code,
        model_field="from",
        **loading_kwargs(spec),
    )
    max_seq_len = spec.max_seq_len
    limit = max_positions(base)
    if (
        limit is not None
        and prompter.model_kind == "causal"
        and max_seq_len + spec.num_virtual_tokens > limit
    ):
        # The virtual tokens occupy positions in front of every input.
        max_seq_len = limit - spec.num_virtual_tokens
        if max_seq_len < 2:
            raise UserError(
                f"num_virtual_tokens {spec.num_virtual_tokens} leaves no room in the model's {limit} positions",
                field="num_virtual_tokens",
            )
        ctx.log(f"max_seq_len lowered to {max_seq_len}: the model reads {limit} positions")
    return base, max_seq_len


def _wrap_soft(
    spec: PromptSpec, ctx: StageContext, base: Any, tokenizer: PreTrainedTokenizerBase
) -> Any:
    """The base wrapped by peft with a freshly initialised soft prompt (seeded: a resumed run
    rebuilds the one it left)."""
    import transformers

    from mlsteps.prompt import soft_prompt

    transformers.set_seed(ctx.seed)  # the initial soft prompt is random
    return soft_prompt.wrap(
        base,
        tokenizer,
        method=spec.method,
        num_virtual_tokens=spec.num_virtual_tokens,
        init_text=spec.init_text,
        gradient_checkpointing=spec.train.gradient_checkpointing,
    )


def _soft_request(
    spec: PromptSpec,
    ctx: StageContext,
    prompter: Prompter,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    val_sets: dict[str, list[dict[str, Any]]],
    max_seq_len: int,
) -> TrainRequest:
    """The training request: datasets, collator, trainer and validation of a soft prompt.

    Classification trains through the verbalizer (cross-entropy over the label words' scores);
    generation trains the answer's tokens as a language model."""
    from mlsteps.engine import validation_sets as vs
    from mlsteps.engine.training import TrainRequest
    from mlsteps.prompt import soft_prompt
    from mlsteps.prompt.scoring import PromptCollator, pad_id_of

    classify = spec.task == "classification"
    build = soft_prompt.build_verbalizer_dataset if classify else soft_prompt.build_dataset
    train_ds = build(rows, prompter, tokenizer, max_seq_len=max_seq_len)
    eval_ds = vs.map_sets(
        val_sets, lambda _, val_rows: build(val_rows, prompter, tokenizer, max_seq_len=max_seq_len)
    )
    collator: Any = (
        soft_prompt.VerbalizerCollator(pad_id_of(tokenizer))
        if classify
        else PromptCollator(pad_id_of(tokenizer))
    )
    extra_eval = None
    if classify:
        extra_eval = vs.named_evaluation(
            vs.map_sets(
                val_sets,
                lambda _, val_rows: soft_prompt.classification_eval(
                    prompter,
                    tokenizer,
                    val_rows[:VAL_CLASSIFY_ROWS],
                    batch_size=spec.train.batch_size,
                ),
            )
        )
    trainer_cls = soft_prompt.VerbalizerTrainer if classify else soft_prompt.SoftPromptTrainer
    return TrainRequest(
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_ds,
        eval_dataset=vs.trainer_eval_dataset(eval_ds),
        data_collator=collator,
        spec=spec.train,
        ctx=ctx,
        trainer_cls=trainer_cls,
        extra_eval=extra_eval,
        # Our collator builds the batches; the Trainer must not drop columns by signature.
        args_overrides={"remove_unused_columns": False, "label_names": ["labels"]},
        seq_len_for_mfu=max_seq_len,
        # Verbalizer rows hold candidate lists, which the length-grouping sampler cannot measure.
        group_by_length=False if classify else None,
    )

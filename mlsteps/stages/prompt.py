"""The `prompt` stage: hard prompts (zero_shot, few_shot) or soft prompts trained with peft.

final/ is a *prompted model* (see :mod:`mlsteps.prompt.prompter`): ``mlsteps_prompt.json`` (template,
demonstrations, separators, verbalizer, base model reference) + the tokenizer, and for soft
prompts the peft adapter (loadable with ``PeftModel.from_pretrained(base, final)``).
Every input problem is a UserError raised before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlsteps.context import StageContext, StageResult
from mlsteps.distributed import main_process_first
from mlsteps.errors import UserError
from mlsteps.positions import config_max_positions
from mlsteps.prompt.prompter import (
    PROMPT_FILE,
    SOFT_METHODS,
    Prompter,
    demonstrations_from_rows,
    prompt_file,
    select_demonstrations,
    template_fields,
)
from mlsteps.recipe.specs.prompt import PromptSpec
from mlsteps.text_io import atomic_write_jsonl

PREVIEW_FILE = "prompts_preview.jsonl"
# Rank-classification accuracy during training is computed on at most this many validation rows.
VAL_CLASSIFY_ROWS = 200
# Rows whose prompts are measured (token length) for the prompt_tokens_* metrics.
LENGTH_SAMPLE_ROWS = 200


def run(spec: PromptSpec, ctx: StageContext) -> StageResult:
    """Build a prompted model; for soft-prompt methods train it (resuming if interrupted)."""
    where = f"stages.{ctx.stage}"
    source = ctx.resolve_source(spec.from_)
    _check_source(source, spec.from_, where)
    prompter = Prompter(
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
    template_fields(spec.template, spec.template_format, where=f"{where}.template")  # syntax
    with main_process_first():  # rank 0 fills the datasets cache; the other ranks reuse it
        rows, val_sets = _load_data(spec, ctx, prompter, where)
    from mlsteps.engine.inference import kind_from_config
    from mlsteps.engine.modeling import ensure_pad_token, load_config, load_tokenizer

    config = load_config(
        source,
        trust_remote_code=spec.trust_remote_code,
        where=f"{where}.from",
        shown=spec.from_,
    )
    kind = kind_from_config(config)
    if kind not in ("clm", "seq2seq"):
        raise UserError(
            f"{spec.from_!r} is a {kind or config.model_type} model; prompting needs a causal LM "
            "or a seq2seq model",
            where=f"{where}.from",
        )
    prompter.model_kind = "seq2seq" if kind == "seq2seq" else "causal"
    tokenizer = load_tokenizer(
        source, trust_remote_code=spec.trust_remote_code, where=f"{where}.from"
    )
    ensure_pad_token(tokenizer)
    prompter.chat = _uses_chat(spec, kind, tokenizer, f"{where}.chat")
    if prompter.chat:
        prompter.use_chat_template(tokenizer)
        ctx.log("prompts are chat turns through the model's chat template")
    if spec.verbalizer:
        from mlsteps.prompt.scoring import check_verbalizer

        check_verbalizer(
            tokenizer,
            spec.verbalizer,
            answer_prefix=prompter.answer_prefix,
            seq2seq=kind == "seq2seq",
            where=f"{where}.verbalizer",
        )
    if spec.method == "few_shot":
        assert rows is not None
        pool = demonstrations_from_rows(rows, prompter, where=f"{where}.data")
        if spec.per_example:
            prompter.demo_pool = pool
        else:
            prompter.demos = [
                pool[i] for i in select_demonstrations(len(pool), spec.shots, ctx.seed)
            ]
    preview_source = next(iter(val_sets.values()), None) or rows or []
    if spec.method not in SOFT_METHODS:
        return _finish_hard(spec, ctx, prompter, tokenizer, preview_source, config)
    assert rows is not None
    return _train_soft(spec, ctx, prompter, tokenizer, rows, val_sets, where)


def _uses_chat(spec: PromptSpec, kind: str | None, tokenizer: Any, where: str) -> bool:
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
            where=where,
            hint="fine-tune it with task: chat (chat_template: chatml), or remove chat",
        )
    return kind == "clm" and has_template


def _check_source(source: str, ref: str, where: str) -> None:
    path = Path(source)
    if (path / PROMPT_FILE).is_file():
        raise UserError(
            f"{ref!r} is already a prompted model; prompt stages do not stack",
            where=f"{where}.from",
            hint="point 'from' at the model that stage prompts",
        )
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"{ref!r} is a peft adapter, not a full model",
            where=f"{where}.from",
            hint="write a merged model in that finetune stage (merge: true)",
        )


def _as_text(value: Any, column: str, index: int, where: str) -> str:
    if isinstance(value, list):
        value = value[0] if value else None  # several references: the first is the target
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"row {index} has an empty '{column}'", where=where)
    return str(value)


def _check_rows(
    rows: list[dict[str, Any]],
    spec: PromptSpec,
    prompter: Prompter,
    where: str,
    *,
    need_target: bool,
) -> None:
    columns = list(rows[0])
    prompter.check_columns(columns, where=f"{where}.template")
    if not need_target:
        return
    if spec.target_column not in columns:
        raise UserError(
            f"target column '{spec.target_column}' not found; the data has: {', '.join(columns)}",
            where=f"{where}.target_column",
        )
    for i, row in enumerate(rows):
        row[spec.target_column] = _as_text(row[spec.target_column], spec.target_column, i, where)
        prompter.label_word(row[spec.target_column])  # every label needs a verbalizer word


def _load_data(
    spec: PromptSpec, ctx: StageContext, prompter: Prompter, where: str
) -> tuple[list[dict[str, Any]] | None, dict[str, list[dict[str, Any]]]]:
    """Training/demonstration rows (None without data) and the validation sets by name ('' for
    the unnamed one), checked."""
    if spec.data is None:
        return None, {}
    from mlsteps.engine import validation_sets as vs
    from mlsteps.engine.data import load_rows, split_validation

    soft = spec.method in SOFT_METHODS
    # Nulls are found at load time, by file line (row numbers change with the split below).
    need = [spec.target_column] if spec.method != "zero_shot" else []
    ds = load_rows(spec.data, where=f"{where}.data", cache_dir=ctx.cache_dir, required=need)
    val_ds: dict[str, Any] = {}
    if spec.validation is not None:
        val_ds = vs.map_sets(
            vs.data_sets(spec.validation),
            lambda name, data: load_rows(
                data,
                where=vs.where_of(f"{where}.validation", name),
                cache_dir=ctx.cache_dir,
                required=[spec.target_column] if soft else [],
            ),
        )
    elif soft:
        ds, held_out = split_validation(
            ds, spec.validation_fraction, ctx.seed, where=f"{where}.data"
        )
        val_ds = {"": held_out} if held_out is not None else {}
    rows = [dict(r) for r in ds]
    val_sets = {name: [dict(r) for r in d] for name, d in val_ds.items()}
    need_target = spec.method != "zero_shot"
    _check_rows(rows, spec, prompter, f"{where}.data", need_target=need_target)
    for name, val_rows in val_sets.items():
        if val_rows:
            at = vs.where_of(f"{where}.validation", name)
            _check_rows(val_rows, spec, prompter, at, need_target=soft)
    if spec.method == "few_shot" and spec.shots > len(rows):
        raise UserError(
            f"shots is {spec.shots} but the data has only {len(rows)} rows",
            where=f"{where}.shots",
            hint=f"set shots <= {len(rows)} or give more demonstration rows",
        )
    return rows, val_sets


def prompt_length_metrics(
    prompter: Prompter, tokenizer: Any, rows: list[dict[str, Any]]
) -> dict[str, float]:
    """Token length of rendered prompts (mean/max over a sample of rows)."""
    from mlsteps.prompt.scoring import encode_prompt

    seq2seq = prompter.model_kind == "seq2seq"
    lengths = [
        len(encode_prompt(tokenizer, prompter.render(r), seq2seq=seq2seq))
        for r in rows[:LENGTH_SAMPLE_ROWS]
    ]
    if not lengths:
        return {}
    return {
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 2),
        "prompt_tokens_max": max(lengths),
    }


def write_preview(ctx: StageContext, records: list[dict[str, Any]]) -> Path:
    """prompts_preview.jsonl: one JSON object per previewed row (prompt, target, outputs)."""
    return atomic_write_jsonl(ctx.stage_dir / PREVIEW_FILE, records)


class _NoWeights:
    """Hard prompts have no weights of their own: save_final writes tokenizer + json only."""

    def save_pretrained(self, directory: Any) -> None:
        return None


def _finish_hard(
    spec: PromptSpec,
    ctx: StageContext,
    prompter: Prompter,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    config: Any,
) -> StageResult:
    from mlsteps.engine.training import save_final

    records: list[dict[str, Any]] = []
    for row in rows[: spec.preview_rows]:
        record: dict[str, Any] = {"prompt": prompter.render(row)}
        if spec.target_column in row:
            record["target"] = prompter.continuation(prompter.label_word(row[spec.target_column]))
        records.append(record)
    if not records:  # zero_shot without data: show the template and what it reads
        records.append({"template": prompter.template, "fields": prompter.fields})
    preview = write_preview(ctx, records)
    metrics: dict[str, Any] = {"trainable_params": 0, "num_demonstrations": prompter.shots}
    metrics.update(prompt_length_metrics(prompter, tokenizer, rows))
    limit = config_max_positions(config)
    if limit and metrics.get("prompt_tokens_max", 0) > limit:
        ctx.log(
            f"warning: prompts reach {metrics['prompt_tokens_max']} tokens but the model reads "
            f"{limit}; their start (demonstrations) will be cut"
        )
    final = save_final(
        _NoWeights(), tokenizer, ctx, extra_files=prompt_file(prompter, ctx.final_dir)
    )
    return StageResult(metrics=metrics, outputs={"final": str(final), "preview": str(preview)})


def _train_soft(
    spec: PromptSpec,
    ctx: StageContext,
    prompter: Prompter,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    val_sets: dict[str, list[dict[str, Any]]],
    where: str,
) -> StageResult:
    import transformers

    from mlsteps.engine import validation_sets as vs
    from mlsteps.engine.modeling import load_model, loaded_metrics, loading_kwargs, max_positions
    from mlsteps.engine.training import save_final, train
    from mlsteps.prompt import soft_prompt
    from mlsteps.prompt.scoring import PromptCollator, pad_id_of

    task = "seq2seq" if prompter.model_kind == "seq2seq" else "clm"
    base = load_model(
        prompter.base_model,
        task,
        trust_remote_code=spec.trust_remote_code,
        where=f"{where}.from",
        **loading_kwargs(spec),
    )
    loaded = loaded_metrics(base, spec)
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
                where=f"{where}.num_virtual_tokens",
            )
        ctx.log(f"max_seq_len lowered to {max_seq_len}: the model reads {limit} positions")
    transformers.set_seed(ctx.seed)  # the initial soft prompt is random
    model = soft_prompt.wrap(
        base,
        tokenizer,
        method=spec.method,
        num_virtual_tokens=spec.num_virtual_tokens,
        init_text=spec.init_text,
        gradient_checkpointing=spec.train.gradient_checkpointing,
        where=where,
    )
    trainable, total = soft_prompt.trainable_parameters(model)
    ctx.log(f"{spec.method}: {trainable:,} trainable of {total:,} parameters")
    # Classification trains through the verbalizer (cross-entropy over the label words' scores);
    # generation trains the answer's tokens as a language model.
    classify = spec.task == "classification"
    build = soft_prompt.build_verbalizer_dataset if classify else soft_prompt.build_dataset
    train_ds = build(rows, prompter, tokenizer, max_seq_len=max_seq_len)
    val_sets = {name: val_rows for name, val_rows in val_sets.items() if val_rows}
    eval_ds = vs.map_sets(
        val_sets, lambda _, val_rows: build(val_rows, prompter, tokenizer, max_seq_len=max_seq_len)
    )
    collator: Any = (
        soft_prompt.VerbalizerCollator(pad_id_of(tokenizer))
        if classify
        else PromptCollator(pad_id_of(tokenizer))
    )
    extra_eval = None
    if spec.task == "classification":
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
    outcome = train(
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_ds,
        eval_dataset=vs.trainer_eval_dataset(eval_ds),
        data_collator=collator,
        spec=spec.train,
        ctx=ctx,
        trainer_cls=soft_prompt.VerbalizerTrainer if classify else soft_prompt.SoftPromptTrainer,
        extra_eval=extra_eval,
        # Our collator builds the batches; the Trainer must not drop columns by signature.
        args_overrides={"remove_unused_columns": False, "label_names": ["labels"]},
        seq_len_for_mfu=max_seq_len,
        # Verbalizer rows hold candidate lists, which the length-grouping sampler cannot measure.
        group_by_length=False if classify else None,
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

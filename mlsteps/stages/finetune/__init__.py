"""The `finetune` stage: classification, seq2seq or instruction SFT; full fine-tuning or LoRA.

Order of work (every check that can fail on user input runs before anything is written):
rows + columns -> tokenizer -> label map (classification) -> model (task head, lengths vs
positions) -> tokenisation (cell checks) -> LoRA (target check) -> train (shared Trainer
wrapper: checkpoints, resume, metrics.jsonl; validation by loss, accuracy/F1 or generation)
-> predictions.jsonl -> final/ (last, atomic).

Truncation lengths left at their defaults shrink to the model's positions; explicit ones that
exceed them are a UserError. With a template (causal_lm) or source_prefix (seq2seq), final/
also gets mlsteps_prompt.json so that eval/predict build inputs exactly as training did.

final/ holds a plain transformers model (full, or LoRA with ``merge: true``) or a peft adapter
whose ``base_model_name_or_path`` is the resolved source (stage final dir, local dir or hub id);
the tokenizer is saved next to either. A classification adapter also writes
``mlsteps_adapter.json`` with its label map (an adapter has no config.json to carry it).
Every module that loading initialised anew (a classifier, a pooler an MLM checkpoint lacks)
is trained and saved with the adapter (``modules_to_save``), so the adapter reloads exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import DataCollatorForSeq2Seq

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.distributed import main_process_first
from mlsteps.engine import chat_data, lora
from mlsteps.engine import validation_sets as vs
from mlsteps.engine.modeling import (
    check_compatible,
    ensure_pad_token,
    load_tokenizer,
    loaded_metrics,
    max_positions,
)
from mlsteps.engine.training import TrainRequest, train
from mlsteps.errors import field_scope
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages.finetune import chat
from mlsteps.stages.finetune import data as fd
from mlsteps.stages.finetune import evaluation as fe
from mlsteps.stages.finetune import model as fm
from mlsteps.stages.finetune import prepare as prep_

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@stage_entry
def run(spec: FinetuneSpec, ctx: StageContext) -> StageResult:
    """Fine-tune per ``spec``; returns train/validation metrics and the final/ path."""
    with main_process_first():  # rank 0 fills the datasets cache; the other ranks reuse it
        train_rows, val_sets, explicit_val = prep_.load_sets(spec, ctx)
    source = ctx.resolve_source(spec.from_) if spec.from_ else None
    tokenizer = _tokenizer(spec, ctx, source)
    label2id = None
    if spec.task == "classification":
        val_sets, label2id = prep_.labels(spec, train_rows, val_sets, explicit_val, ctx)
    loading_info: dict[str, Any] = {}
    model = fm.model(spec, ctx, tokenizer, source, label2id, loading_info)
    spec = _fit_to_model(spec, ctx, model, tokenizer)
    with main_process_first():
        prep = prep_.prepare(spec, train_rows, val_sets, explicit_val, tokenizer, label2id)
    if spec.task in ("causal_lm", "chat"):
        # No KV cache in training; it also lets packed position_ids become a block-diagonal mask.
        model.config.use_cache = False
    loaded = loaded_metrics(model, spec)
    model = _adapt(spec, model, tokenizer, prep, loading_info)
    gen_evals = _generation_evals(spec, ctx, tokenizer, prep)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    truncation = fd.truncation_metrics(
        spec, prep.truncated, len(train_rows), validation=bool(prep.validation), log=ctx.log
    )
    ctx.log(
        f"{spec.task}/{spec.method}: {len(prep.train)} training sequences, "
        f"{sum(len(v) for v in prep.validation.values())} validation, "
        f"{n_trainable:,} trainable parameters"
    )
    outcome = train(_train_request(spec, ctx, model, tokenizer, prep, gen_evals))

    metrics: dict[str, Any] = dict(outcome.metrics)
    metrics.update(trainable_params=n_trainable, train_rows=len(train_rows), **truncation)
    metrics.update(loaded)
    for name, gen_eval in gen_evals.items():
        if gen_eval.outputs is not None:
            metrics.update({vs.metric_name(k, name): v for k, v in gen_eval.conventions().items()})
            gen_eval.write_predictions(ctx, name)
    model.config.use_cache = True
    extra_files = fe.prompter_json(spec, ctx, train_rows, source)
    final = fm.save(
        spec, ctx, model, tokenizer, source, label2id, extra_files, outcome.full_state_dict
    )
    return StageResult(metrics=metrics, outputs={"final": str(final)})


def _tokenizer(spec: FinetuneSpec, ctx: StageContext, source: str | None) -> Any:
    """The tokenizer (``tokenizer:`` or the model's own), with a pad token and, for chat, the
    chat template (before the model: a builtin template may add tokens)."""
    tok_source = ctx.resolve_source(spec.tokenizer) if spec.tokenizer else source
    assert tok_source is not None  # the spec validator guarantees 'from' or 'tokenizer'
    with field_scope("tokenizer" if spec.tokenizer else "from"):
        tokenizer = load_tokenizer(tok_source, trust_remote_code=spec.trust_remote_code)
    ensure_pad_token(tokenizer)
    if spec.task == "chat":
        with field_scope("chat_template"):
            chat_data.set_template(tokenizer, spec.chat_template)
    return tokenizer


def _fit_to_model(
    spec: FinetuneSpec, ctx: StageContext, model: Any, tokenizer: PreTrainedTokenizerBase
) -> FinetuneSpec:
    """Chat: embeddings for the template's tokens and the turn end as EOS. Lengths left at their
    defaults shrink to the model's positions; the rest are checked against them."""
    if spec.task == "chat":
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        chat.use_turn_end_as_eos(tokenizer, model, spec.chat_template)
    spec = _fit_lengths(spec, model, ctx)
    check_compatible(model, tokenizer, max_seq_len=_max_len(spec))  # the stage's error
    if spec.task == "seq2seq":
        check_compatible(model, tokenizer, max_seq_len=spec.max_target_len)
    return spec


def _max_len(spec: FinetuneSpec) -> int:
    """The input length of one training example (the source's, for seq2seq)."""
    return spec.max_source_len if spec.task == "seq2seq" else spec.max_seq_len


def _adapt(
    spec: FinetuneSpec,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prep: prep_.Prepared,
    loading_info: dict[str, Any],
) -> Any:
    """LoRA wrapping (method lora) and the seq2seq collator, which needs the final model."""
    if spec.method == "lora":
        with field_scope("lora.target_modules"):
            model = lora.wrap(
                model, spec.lora, fm.model_task(spec), loading_info=loading_info,
                kbit=spec.quantization is not None,
                gradient_checkpointing=spec.train.gradient_checkpointing,
            )  # fmt: skip
    if spec.task == "seq2seq":
        prep.collator = DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=fd.IGNORE_INDEX
        )
    return model


def _generation_evals(
    spec: FinetuneSpec, ctx: StageContext, tokenizer: PreTrainedTokenizerBase, prep: prep_.Prepared
) -> dict[str, fe.GenerationEval]:
    """Generation-based validation, per validation set that has generation inputs."""
    seed = spec.generation.seed if spec.generation.seed is not None else ctx.seed
    return {
        name: fe.GenerationEval(
            spec,
            tokenizer,
            inputs,
            refs,
            seed=seed,
            field=vs.where_of("validation", name),
        )  # fmt: skip
        for name, (inputs, refs) in prep.gen.items()
        if inputs
    }


def _train_request(
    spec: FinetuneSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prep: prep_.Prepared,
    gen_evals: dict[str, fe.GenerationEval],
) -> TrainRequest:
    return TrainRequest(
        model=model,
        tokenizer=tokenizer,
        train_dataset=prep.train,
        eval_dataset=vs.trainer_eval_dataset(prep.validation),
        data_collator=prep.collator,
        spec=spec.train,
        ctx=ctx,
        compute_metrics=prep.compute_metrics,
        extra_eval=vs.named_evaluation(gen_evals),
        # Loss-only evaluation for LMs: gathering vocab-sized logits of the whole validation set
        # would need gigabytes for nothing.
        args_overrides={"prediction_loss_only": spec.task != "classification"},
        trainer_kwargs=prep.trainer_kwargs,
        group_by_length=False if spec.packing and spec.task in ("causal_lm", "chat") else None,
        seq_len_for_mfu=_max_len(spec),
    )


def _fit_lengths(spec: FinetuneSpec, model: Any, ctx: StageContext) -> FinetuneSpec:
    """Truncation lengths the recipe left at their defaults shrink to the model's positions;
    lengths set explicitly are kept (and checked by check_compatible)."""
    limit = max_positions(model)
    if limit is None:
        return spec
    update = {
        name: limit
        for name in (
            ("max_source_len", "max_target_len") if spec.task == "seq2seq" else ("max_seq_len",)
        )
        if name not in spec.model_fields_set and getattr(spec, name) > limit
    }
    if update:
        ctx.log(
            f"model has {limit} positions: using {', '.join(f'{k}={v}' for k, v in update.items())}"
        )
    return spec.model_copy(update=update) if update else spec

"""The `pretrain` stage: causal-LM or masked-LM pretraining, from scratch or continued.

Documents are tokenised and packed shard by shard into a memory-mapped block file, cached by
content (``packing`` here, ``mlsteps.cache``; memory does not grow with the corpus), and trained
through ``engine.training.train``. Validation loss is token-weighted (ΣNLL / Σscored tokens over the whole validation set), so the perplexity reported
is exp of that, never a mean of batch perplexities. ``final/`` holds model + tokenizer, loadable as
is by ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` and ``AutoTokenizer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets
from transformers import set_seed

from mlsteps import distributed
from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.distributed import main_process_first
from mlsteps.engine.data import TEXT_COLUMN, load_text, split_validation
from mlsteps.engine.modeling import (
    build_model,
    check_compatible,
    count_parameters,
    ensure_pad_token,
    freeze_unseen_embeddings,
    load_model,
    load_tokenizer,
    loaded_metrics,
    loading_kwargs,
    max_positions,
)
from mlsteps.engine.training import TrainRequest, save_final, train
from mlsteps.engine.validation_sets import named_evaluation
from mlsteps.errors import UserError, field_scope
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.stages.pretrain import lm_data, packing, streaming

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Masks of the validation set are drawn once from this seed offset, identical at every eval.
_EVAL_MASK_SEED_OFFSET = 7919


def _load_text(spec: PretrainSpec, ctx: StageContext) -> tuple[Any, Any]:
    def text(sources: list[Any], field: str) -> Any:
        load = streaming.load_streamed_text if streaming.any_streamed(sources) else load_text
        return load(
            sources,
            spec.text_columns,
            data_field=field,
            column_field="text_column",
            cache_dir=ctx.cache_dir,
        )

    rows = text(spec.data, "data")
    if isinstance(spec.validation, dict):  # named sets, each evaluated on its own
        return rows, {n: text(v, f"validation.{n}") for n, v in spec.validation.items()}
    if spec.validation is not None:
        return rows, text(spec.validation, "validation")
    with field_scope("validation_fraction"):
        return split_validation(rows, spec.validation_fraction, ctx.seed)


def _load_tokenizer_and_model(spec: PretrainSpec, ctx: StageContext) -> tuple[Any, Any]:
    model_source = ctx.resolve_source(spec.from_) if spec.from_ else None
    tok_ref = spec.tokenizer or spec.from_
    assert tok_ref is not None  # the spec validator guarantees 'from' or 'tokenizer'
    tok_source = ctx.resolve_source(tok_ref)  # an unreachable hub is the stage's error
    tok_field = "tokenizer" if spec.tokenizer else "from"
    with field_scope(tok_field):
        tokenizer = load_tokenizer(tok_source, trust_remote_code=spec.trust_remote_code)
    if spec.objective == "clm":
        ensure_pad_token(tokenizer)
        if tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
            raise UserError(
                "the tokenizer has no EOS token to separate documents",
                field="tokenizer",
                hint="train it with target: clm, or use a tokenizer with an eos token",
            )
    elif tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
        raise UserError(
            "objective mlm needs a tokenizer with mask, cls and sep tokens",
            field="tokenizer",
            hint="train the tokenizer with target: mlm",
        )
    # Same seed, same initial weights: a resumed run rebuilds the model it left, then loads it.
    set_seed(ctx.seed)
    if model_source is not None:
        model = load_model(
            model_source,
            spec.objective,
            trust_remote_code=spec.trust_remote_code,
            model_field="from",
            **loading_kwargs(spec),
        )
    else:
        assert spec.model is not None
        model = build_model(
            spec.model,
            tokenizer,
            spec.objective,
            model_field="model",
            attn_implementation=spec.attn_implementation,
        )
    with field_scope(tok_field):
        check_compatible(model, tokenizer, max_seq_len=None)
    with field_scope("max_seq_len"):
        check_compatible(model, tokenizer, max_seq_len=spec.max_seq_len)
    return tokenizer, model


def _pack(
    spec: PretrainSpec,
    ds: datasets.Dataset | streaming.StreamedText,
    tokenizer: PreTrainedTokenizerBase,
    ctx: StageContext,
    *,
    train_split: bool,
    set_name: str = "",
) -> packing.PackedBlocks:
    field = "data" if train_split or spec.validation is None else "validation"
    place = field + (f".{set_name}" if set_name else "")
    if spec.objective == "clm":
        end_id = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        wrap = None
    else:
        end_id = tokenizer.sep_token_id
        wrap = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    streamed = ds if isinstance(ds, streaming.StreamedText) else None
    # Shard by shard into a memory-mapped block file, through the packed-data cache.
    with field_scope(place):
        return packing.pack_corpus(
            streamed.dataset if streamed else ds,
            tokenizer,
            TEXT_COLUMN,
            end_id=end_id,
            block_len=spec.max_seq_len,
            # Validation keeps its tail: every held-out token should be scored.
            keep_remainder=spec.keep_remainder or not train_split,
            wrap=wrap,
            what="training text" if train_split else "validation text",
            log=ctx.log,
            fingerprint=streamed.fingerprint if streamed else None,
        )


@stage_entry
def run(spec: PretrainSpec, ctx: StageContext) -> StageResult:
    """Pretrain, evaluate token-weighted validation perplexity, write ``final/``."""
    with main_process_first():  # rank 0 fills the datasets cache; the other ranks reuse it
        train_rows, val_rows = _load_text(spec, ctx)
    tokenizer, model = _load_tokenizer_and_model(spec, ctx)
    with main_process_first():
        train_blocks = _pack(spec, train_rows, tokenizer, ctx, train_split=True)
        named = val_rows if isinstance(val_rows, dict) else {"": val_rows} if val_rows else {}
        val_sets = {
            n: _pack(spec, rows, tokenizer, ctx, train_split=False, set_name=n)
            for n, rows in named.items()
        }
    n_params = count_parameters(model)
    vocab_size = model.get_input_embeddings().num_embeddings
    seen = lm_data.seen_token_ids(train_blocks, vocab_size)
    ctx.log(
        f"{spec.objective}: {len(train_blocks)} training blocks of {spec.max_seq_len} tokens, "
        f"{sum(len(b) for b in val_sets.values())} validation blocks, "
        f"{n_params:,} parameters; {len(seen):,} of {vocab_size:,} token ids occur in the "
        "training text"
    )
    if spec.freeze_unseen_tokens:
        _freeze_unseen(model, tokenizer, seen, ctx)
    collator, evaluator = _collator_and_evaluation(spec, ctx, tokenizer, val_sets)
    outcome = train(
        TrainRequest(
            model=model,
            tokenizer=tokenizer,
            train_dataset=train_blocks,
            eval_dataset=None,
            data_collator=collator,
            spec=spec.train,
            ctx=ctx,
            extra_eval=evaluator,
            group_by_length=False,  # packed blocks all have the same length
            seq_len_for_mfu=spec.max_seq_len,
            eval_at_start=True,
        )
    )

    metrics: dict[str, Any] = dict(outcome.metrics)
    metrics["parameters"] = n_params
    metrics.update(loaded_metrics(model, spec))
    metrics["train_blocks"] = len(train_blocks)
    metrics["train_tokens_per_epoch"] = train_blocks.n_tokens
    # Token ids that never occur in training learn nothing about their meaning (see
    # freeze_unseen_tokens): a later stage that needs many of them is better served by more data.
    metrics["train_vocab_coverage"] = len(seen) / vocab_size
    for key, value in outcome.initial_metrics.items():
        if key.endswith(("_loss", "_perplexity")):
            metrics[f"initial_{key}"] = value
    if any(k.startswith("val_") and k.endswith("_perplexity") for k in metrics):
        metrics["perplexity_convention"] = _convention(spec)
        for set_name, blocks in val_sets.items():
            _unigram_check(metrics, train_blocks, blocks, tokenizer, vocab_size, ctx, set_name)
    limit = max_positions(model)
    if limit is not None:
        # Lets downstream users truncate to what the model can read (tokenizers trained here
        # start with an unlimited model_max_length).
        tokenizer.model_max_length = limit
    final = save_final(model, tokenizer, ctx, state_dict=outcome.full_state_dict)
    return StageResult(metrics=metrics, outputs={"final": str(final)})


def _collator_and_evaluation(
    spec: PretrainSpec,
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    val_sets: dict[str, Any],
) -> tuple[Any, Any]:
    """The training collator (CLM shift, or MLM masking seeded by the recipe) and the exact
    token-weighted validation of every set (MLM: masked with its own fixed seed)."""
    collator: Any
    evaluators = {}
    if spec.objective == "clm":
        collator = lm_data.CausalCollator(tokenizer.pad_token_id)
        for set_name, val_blocks in val_sets.items():
            batches = lm_data.eval_batches(val_blocks, collator, spec.train.batch_size)
            evaluators[set_name] = lm_data.LossEvaluator(batches, causal=True)
        return collator, named_evaluation(evaluators)
    collator = lm_data.MaskingCollator(
        tokenizer,
        probability=spec.mlm_probability,
        whole_word=spec.whole_word_mask,
        seed=ctx.seed,
    )
    for set_name, val_blocks in val_sets.items():
        eval_masker = lm_data.MaskingCollator(
            tokenizer,
            probability=spec.mlm_probability,
            whole_word=spec.whole_word_mask,
            seed=ctx.seed + _EVAL_MASK_SEED_OFFSET,
        )
        batches = lm_data.eval_batches(val_blocks, eval_masker, spec.train.batch_size)
        evaluators[set_name] = lm_data.LossEvaluator(batches, causal=False)
    return collator, named_evaluation(evaluators)


def _freeze_unseen(
    model: Any, tokenizer: PreTrainedTokenizerBase, seen: Any, ctx: StageContext
) -> None:
    conf = distributed.settings() if distributed.is_distributed() else None
    if conf is not None and (conf.fsdp is not None or conf.deepspeed is not None):
        # Sharded engines flatten parameters: a hook on the original weight would not fire.
        ctx.log("freeze_unseen_tokens: not applied under FSDP/DeepSpeed")
        return
    # Special tokens stay trainable: MLM's mask token only appears once the collator masks.
    trainable = sorted({int(i) for i in seen} | set(tokenizer.all_special_ids))
    frozen = freeze_unseen_embeddings(model, trainable)
    if frozen:
        ctx.log(f"{frozen:,} embedding rows of token ids absent from the training text are frozen")


def _unigram_check(
    metrics: dict[str, Any],
    train_blocks: packing.PackedBlocks,
    val_blocks: packing.PackedBlocks,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    ctx: StageContext,
    set_name: str = "",
) -> None:
    """Report the context-free (unigram) perplexity next to the model's, and warn when the model
    is not clearly below it: such a model has learned token frequencies only, and its features
    are nearly the same for every input. A tiny BERT stuck there after 800 MLM steps fine-tuned
    to 0.60 accuracy on zh_reviews against 0.72 from scratch (docs/quickstart.md)."""
    unigram = lm_data.unigram_perplexity(
        train_blocks, val_blocks, vocab_size, skip_ids=tokenizer.all_special_ids
    )
    val = f"val_{set_name}_" if set_name else "val_"  # named sets: see named_evaluation
    metrics[f"unigram_{val}perplexity"] = unigram
    model_ppl = metrics.get(f"{val}perplexity")
    # 20% below the unigram perplexity is 0.22 nats of context used per token: little, but off
    # the plateau (the stuck BERT above was 20% below after 800 steps, and still collapsed).
    if unigram == unigram and model_ppl is not None and model_ppl > 0.7 * unigram:
        ctx.log(
            f"warning: {val}perplexity {model_ppl:.1f} is not clearly below the "
            f"{unigram:.1f} of token frequencies alone (unigram): the model has learned little context yet, "
            "and a fine-tune from it may start worse than from scratch. Train longer, with a "
            "higher lr, or (MLM) a higher mlm_probability."
        )


def _convention(spec: PretrainSpec) -> str:
    if spec.objective == "clm":
        return (
            f"token-weighted exp(sum NLL / scored tokens) over the validation text packed into "
            f"{spec.max_seq_len}-token blocks (documents joined by EOS, EOS scored, no BOS); "
            "the first token of each block is context only"
        )
    return (
        f"masked-token perplexity: exp(sum NLL / masked tokens), {spec.mlm_probability:.0%} of "
        f"tokens masked 80/10/10 with a fixed seed, {spec.max_seq_len}-token blocks"
        + (", whole-word masking" if spec.whole_word_mask else "")
        + "; not pseudo-perplexity"
    )

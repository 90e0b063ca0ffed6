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

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from mlsteps.context import StageContext, StageResult
from mlsteps.distributed import main_process_first
from mlsteps.engine import chat_data, lora
from mlsteps.engine import validation_sets as vs
from mlsteps.engine.data import load_rows, require_columns, split_validation
from mlsteps.engine.modeling import (
    build_model,
    check_compatible,
    ensure_pad_token,
    load_config,
    load_model,
    load_tokenizer,
    loaded_metrics,
    loading_kwargs,
    max_positions,
)
from mlsteps.engine.training import save_final, train
from mlsteps.errors import UserError
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.recipe.specs.model import ENCODER_ONLY_FAMILIES
from mlsteps.stages.finetune import chat
from mlsteps.stages.finetune import data as fd
from mlsteps.stages.finetune import evaluation as fe

# Model types without a causal-LM head worth training: AutoModelForCausalLM would give them a
# "decoder" head on top of a bidirectional encoder, which silently learns to copy.
_ENCODER_ONLY = {
    *ENCODER_ONLY_FAMILIES,
    "xlm-roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
}


@dataclass
class _Prepared:
    """Tokenised data and task-specific hooks for one run."""

    train: datasets.Dataset
    # Validation sets by name ('' for the one unnamed set; empty without validation).
    validation: dict[str, datasets.Dataset]
    collator: Any = None
    compute_metrics: Callable[..., dict[str, float]] | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    # Per validation set: generation inputs and their references.
    gen: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)
    label2id: dict[str, int] | None = None
    # Examples cut by max_seq_len / max_source_len / max_target_len: (training, validation).
    truncated: tuple[int, int] = (0, 0)

    def pop_truncated(self) -> None:
        """Move the tokenisers' per-row truncation flags out of the datasets into counts."""
        self.train, n_train = fd.pop_truncated(self.train)
        n_val = 0
        for name, ds in self.validation.items():
            self.validation[name], n_cut = fd.pop_truncated(ds)
            n_val += n_cut
        self.truncated = (n_train, n_val)


def run(spec: FinetuneSpec, ctx: StageContext) -> StageResult:
    """Fine-tune per ``spec``; returns train/validation metrics and the final/ path."""
    where = f"stages.{ctx.stage}"
    with main_process_first():  # rank 0 fills the datasets cache; the other ranks reuse it
        train_rows, val_sets, explicit_val = _load_rows(spec, ctx, where)
    source = ctx.resolve_source(spec.from_) if spec.from_ else None
    tok_source = ctx.resolve_source(spec.tokenizer) if spec.tokenizer else source
    assert tok_source is not None  # the spec validator guarantees 'from' or 'tokenizer'
    tokenizer = load_tokenizer(
        tok_source, trust_remote_code=spec.trust_remote_code,
        where=f"{where}.{'tokenizer' if spec.tokenizer else 'from'}",
    )  # fmt: skip
    ensure_pad_token(tokenizer)
    if spec.task == "chat":  # before the model: a builtin template may add tokens
        chat_data.set_template(tokenizer, spec.chat_template, where=f"{where}.chat_template")

    label2id = None
    if spec.task == "classification":
        val_sets, label2id = _labels(spec, train_rows, val_sets, explicit_val, ctx, where)
    loading_info: dict[str, Any] = {}
    model = _model(spec, ctx, tokenizer, source, label2id, where, loading_info)
    if spec.task == "chat":
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        chat.use_turn_end_as_eos(tokenizer, model, spec.chat_template)
    spec = _fit_lengths(spec, model, ctx)
    max_len = spec.max_source_len if spec.task == "seq2seq" else spec.max_seq_len
    check_compatible(model, tokenizer, max_seq_len=max_len, where=where)
    if spec.task == "seq2seq":
        check_compatible(model, tokenizer, max_seq_len=spec.max_target_len, where=where)

    with main_process_first():
        if label2id is not None:
            prep = _prepare_classification(
                spec, train_rows, val_sets, explicit_val, tokenizer, label2id, where
            )
        elif spec.task == "seq2seq":
            prep = _prepare_seq2seq(spec, train_rows, val_sets, tokenizer, where)
        elif spec.task == "chat":
            prep = _prepare_chat(spec, train_rows, val_sets, tokenizer, where)
        else:
            prep = _prepare_sft(spec, train_rows, val_sets, tokenizer, where)
    if spec.task in ("causal_lm", "chat"):
        # No KV cache in training; it also lets packed position_ids become a block-diagonal mask.
        model.config.use_cache = False
    loaded = loaded_metrics(model, spec)
    if spec.method == "lora":
        model = lora.wrap(
            model, spec.lora, _model_task(spec), where=f"{where}.lora.target_modules",
            loading_info=loading_info, kbit=spec.quantization is not None,
            gradient_checkpointing=spec.train.gradient_checkpointing,
        )  # fmt: skip
    if spec.task == "seq2seq":
        prep.collator = DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=fd.IGNORE_INDEX
        )

    seed = spec.generation.seed if spec.generation.seed is not None else ctx.seed
    gen_evals = {
        name: fe.GenerationEval(
            spec,
            tokenizer,
            inputs,
            refs,
            seed=seed,
            where=vs.where_of(f"{where}.validation", name),
        )  # fmt: skip
        for name, (inputs, refs) in prep.gen.items()
        if inputs
    }
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    truncation = fd.truncation_metrics(
        spec, prep.truncated, len(train_rows), validation=bool(prep.validation), log=ctx.log
    )
    ctx.log(
        f"{spec.task}/{spec.method}: {len(prep.train)} training sequences, "
        f"{sum(len(v) for v in prep.validation.values())} validation, "
        f"{n_trainable:,} trainable parameters"
    )
    outcome = train(
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
        seq_len_for_mfu=max_len,
    )

    metrics: dict[str, Any] = dict(outcome.metrics)
    metrics.update(trainable_params=n_trainable, train_rows=len(train_rows), **truncation)
    metrics.update(loaded)
    for name, gen_eval in gen_evals.items():
        if gen_eval.outputs is not None:
            metrics.update({vs.metric_name(k, name): v for k, v in gen_eval.conventions().items()})
            gen_eval.write_predictions(ctx, name)
    model.config.use_cache = True
    extra_files = fe.prompter_json(spec, ctx, train_rows, source)
    final = _save(
        spec, ctx, model, tokenizer, source, label2id, extra_files, outcome.full_state_dict
    )
    return StageResult(metrics=metrics, outputs={"final": str(final)})


# ---------------------------------------------------------------- data


def _load_rows(
    spec: FinetuneSpec, ctx: StageContext, where: str
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset], bool]:
    """Training rows, the validation sets by name ('' unnamed) and whether they were given."""
    columns = fd.required_columns(spec)
    rows = load_rows(spec.data, where=f"{where}.data", cache_dir=ctx.cache_dir, required=columns)
    require_columns(rows, columns, f"{where}.data")
    if spec.validation is not None:

        def load(name: str, data: Any) -> datasets.Dataset:
            at = vs.where_of(f"{where}.validation", name)
            val = load_rows(data, where=at, cache_dir=ctx.cache_dir, required=columns)
            require_columns(val, columns, at)
            fd.check_not_empty(val, name="validation", where=at)
            return val

        return rows, vs.map_sets(vs.data_sets(spec.validation), load), True
    train_rows, val_rows = split_validation(
        rows, spec.validation_fraction, ctx.seed, where=f"{where}.validation_fraction"
    )
    fd.check_not_empty(train_rows, name="training", where=f"{where}.data")
    return train_rows, ({"": val_rows} if val_rows is not None else {}), False


def _labels(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    explicit_val: bool,
    ctx: StageContext,
    where: str,
) -> tuple[dict[str, datasets.Dataset], dict[str, int]]:
    """The label map (checked against every validation set) and the validation sets to use."""
    label_col = spec.label_column
    if explicit_val:
        label2id = fd.label_mapping(train_rows[label_col], [], where=f"{where}.data")
        for name, rows in val_sets.items():  # each set checked at its own place
            at = vs.where_of(f"{where}.validation", name)
            fd.label_mapping(train_rows[label_col], rows[label_col], where=at)
        return val_sets, label2id
    val_rows = val_sets.get("")
    if val_rows is not None:
        # A random hold-out can catch the only rows of a rare class: drop those rows rather
        # than fail on a split the user did not choose.
        seen = {str(v) for v in train_rows[label_col]}
        kept = val_rows.filter(lambda r: str(r[label_col]) in seen, keep_in_memory=True)
        if len(kept) < len(val_rows):
            ctx.log(
                f"dropped {len(val_rows) - len(kept)} validation rows with labels unseen in training"
            )
        val_rows = kept if len(kept) else None
    val_labels = val_rows[label_col] if val_rows is not None else []
    label2id = fd.label_mapping(train_rows[label_col], val_labels, where=f"{where}.data")
    return ({"": val_rows} if val_rows is not None else {}), label2id


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


def _val_where(where: str, name: str, explicit_val: bool = True) -> str:
    """Where rows of validation set ``name`` come from (a held-out part of 'data' if not given)."""
    return vs.where_of(f"{where}.validation", name) if explicit_val else f"{where}.data"


def _prepare_classification(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    explicit_val: bool,
    tokenizer: Any,
    label2id: dict[str, int],
    where: str,
) -> _Prepared:
    train_ds = fd.tokenize_classification(
        train_rows, tokenizer, spec, label2id, where=f"{where}.data"
    )
    val_ds = vs.map_sets(
        val_sets,
        lambda name, rows: fd.tokenize_classification(
            rows, tokenizer, spec, label2id, where=_val_where(where, name, explicit_val)
        ),
    )
    prep = _Prepared(train_ds, val_ds, DataCollatorWithPadding(tokenizer), label2id=label2id)
    prep.pop_truncated()
    prep.compute_metrics = fe.classification_metrics(where)
    if spec.class_weights:
        weights = fd.inverse_frequency_weights(train_ds["labels"], len(label2id))
        prep.trainer_kwargs["compute_loss_func"] = fe.weighted_loss(weights)
    return prep


def _prepare_seq2seq(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: Any,
    where: str,
) -> _Prepared:
    train_ds = fd.tokenize_seq2seq(train_rows, tokenizer, spec, where=f"{where}.data")
    val_ds = vs.map_sets(
        val_sets,
        lambda name, rows: fd.tokenize_seq2seq(
            rows, tokenizer, spec, where=_val_where(where, name)
        ),
    )
    prep = _Prepared(train_ds, val_ds)
    prep.pop_truncated()
    for name, rows in val_sets.items():
        sample = _sample(rows, spec)
        inputs = [
            fd.seq2seq_source(v, spec, row=i, where=where)
            for i, v in enumerate(sample[spec.source_column])
        ]
        refs = fe.references(sample[spec.target_column], spec.target_column, where)
        prep.gen[name] = (inputs, refs)
    return prep


def _prepare_sft(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: Any,
    where: str,
) -> _Prepared:
    train_ds = fd.tokenize_sft(train_rows, tokenizer, spec, where=f"{where}.data")
    val_ds = vs.map_sets(
        {n: rows for n, rows in val_sets.items() if len(rows)},
        lambda name, rows: fd.tokenize_sft(rows, tokenizer, spec, where=_val_where(where, name)),
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    prep = _Prepared(train_ds, val_ds, fd.SftCollator(pad_token_id=int(pad_id)))
    prep.pop_truncated()
    if spec.packing:
        prep.train = fd.pack_sft(prep.train, spec.max_seq_len)
        prep.validation = vs.map_sets(
            prep.validation, lambda _, ds: fd.pack_sft(ds, spec.max_seq_len)
        )
    for name, val_rows in val_sets.items():
        sample = _sample(val_rows, spec)
        rows = sample.to_list()
        inputs = [
            fd.split_trailing_spaces(fd.sft_prompt(r, spec, index=i, where=where))[0]
            for i, r in enumerate(rows)
        ]
        refs = fe.references(sample[spec.response_column], spec.response_column, where)
        prep.gen[name] = (inputs, refs)
    return prep


def _prepare_chat(
    spec: FinetuneSpec,
    train_rows: datasets.Dataset,
    val_sets: dict[str, datasets.Dataset],
    tokenizer: Any,
    where: str,
) -> _Prepared:
    col, n = spec.messages_column, spec.max_seq_len
    train_ds = chat.tokenize_chat(train_rows, tokenizer, col, n, where=f"{where}.data")
    val_ds = vs.map_sets(
        val_sets,
        lambda name, rows: chat.tokenize_chat(
            rows, tokenizer, col, n, where=_val_where(where, name)
        ),
    )
    if spec.packing:
        train_ds = fd.pack_sft(train_ds, n)
        val_ds = vs.map_sets(val_ds, lambda _, ds: fd.pack_sft(ds, n))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    prep = _Prepared(train_ds, val_ds, fd.SftCollator(pad_token_id=int(pad_id)))
    for name, rows in val_sets.items():
        prep.gen[name] = chat.generation_pairs(
            _sample(rows, spec), tokenizer, col, where=_val_where(where, name)
        )
    return prep


def _model_task(spec: FinetuneSpec) -> str:
    """The model class a task trains: a chat model is a causal LM."""
    return "causal_lm" if spec.task == "chat" else spec.task


def _sample(rows: datasets.Dataset, spec: FinetuneSpec) -> datasets.Dataset:
    limit = spec.validation_max_samples
    return rows.select(range(min(limit, len(rows)))) if limit else rows


# ---------------------------------------------------------------- model


def _model(
    spec: FinetuneSpec,
    ctx: StageContext,
    tokenizer: Any,
    source: str | None,
    label2id: dict[str, int] | None,
    where: str,
    loading_info: dict[str, Any],
) -> Any:
    """The model to fine-tune; ``loading_info`` receives what loading initialised anew."""
    # Same seed, same initial head/adapter weights: a resumed run rebuilds the model it left.
    set_seed(ctx.seed)
    kwargs: dict[str, Any] = {}
    model: Any
    if label2id is not None:
        id2label = {i: label for label, i in label2id.items()}
        kwargs = {"num_labels": len(label2id), "id2label": id2label, "label2id": label2id}
    if spec.model is not None:
        model = build_model(
            spec.model,
            tokenizer,
            _model_task(spec),
            num_labels=kwargs.get("num_labels"),
            where=f"{where}.model",
            attn_implementation=spec.attn_implementation,
        )
        if label2id is not None:
            model.config.id2label, model.config.label2id = kwargs["id2label"], label2id
    else:
        assert source is not None
        config = load_config(
            source, trust_remote_code=spec.trust_remote_code, where=f"{where}.from"
        )
        # Checked on the config, before any weights are downloaded or read.
        _check_task(spec, config, where)
        # A checkpoint already fine-tuned on other classes has a head of another shape.
        extra = {**kwargs, "ignore_mismatched_sizes": True} if label2id is not None else {}
        model = load_model(
            source,
            _model_task(spec),
            trust_remote_code=spec.trust_remote_code,
            where=f"{where}.from",
            loading_info=loading_info,
            **loading_kwargs(spec),
            **extra,
        )
    config = model.config
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        # Sequence classification on decoders picks the last non-pad token: it needs the pad id.
        config.pad_token_id = tokenizer.pad_token_id
    return model


def _check_task(spec: FinetuneSpec, config: Any, where: str) -> None:
    """UserError when the pretrained model cannot do the task (its config says so)."""
    model_type = getattr(config, "model_type", "?")
    if spec.task == "seq2seq" and not getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"task seq2seq needs an encoder-decoder model; {model_type} is not one",
            where=f"{where}.from",
            hint="use a t5 or bart model, or task causal_lm with a template",
        )
    if spec.task in ("causal_lm", "chat") and model_type in _ENCODER_ONLY:
        raise UserError(
            f"task {spec.task} needs a decoder model; {model_type} is an encoder",
            where=f"{where}.from",
            hint="use a gpt2/llama model, or task classification",
        )
    custom_code = bool(getattr(config, "auto_map", None))
    if (
        spec.task == "classification"
        and not custom_code
        and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    ):
        raise UserError(
            f"{model_type} models have no sequence-classification head in transformers",
            where=f"{where}.from",
            hint="use an encoder (bert, roberta), a decoder (gpt2, llama) or t5/bart",
        )


# ---------------------------------------------------------------- final/


def _save(
    spec: FinetuneSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    source: str | None,
    label2id: dict[str, int] | None,
    extra: dict[str, str],
    state_dict: dict[str, Any] | None,
) -> Any:
    if spec.method == "lora" and spec.merge:
        return save_final(lora.merge(model), tokenizer, ctx, extra_files=extra)
    if spec.method == "lora":
        assert source is not None  # LoRA needs a pretrained base ('from'); see FinetuneSpec
        model.peft_config["default"].base_model_name_or_path = source
        info: dict[str, Any] = {"base_model_name_or_path": source, "task": _model_task(spec)}
        if Path(source).is_absolute():
            # adapter_config.json names the base by absolute path (plain peft loads it from any
            # cwd); this relative one lets mlsteps find it after the run directory moved.
            info["base_model_relative"] = os.path.relpath(source, ctx.final_dir.absolute())
        if label2id is not None:
            info.update(num_labels=len(label2id), label2id=label2id,
                        id2label={str(i): label for label, i in label2id.items()})  # fmt: skip
        extra["mlsteps_adapter.json"] = json.dumps(info, indent=1)
        return save_final(model, tokenizer, ctx, extra_files=extra, state_dict=state_dict)
    return save_final(model, tokenizer, ctx, extra_files=extra, state_dict=state_dict)

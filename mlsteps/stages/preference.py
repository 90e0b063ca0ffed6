"""The `preference` stage: DPO, ORPO, KTO or SimPO on TRL's trainers, full or LoRA.

TRL owns the losses (DPOTrainer and its loss types, KTOTrainer, ORPOTrainer, CPOTrainer with
``loss_type=simpo``); mlsteps owns everything around them. The TRL trainer class goes through
the same ``engine.training.train`` as every other stage, so preference tuning gets the same
complete checkpoints, exact resume after kill -9, NaN guard, stop-at-step-boundary,
metrics.jsonl and rank-0-only writes.

Order of work (every check that can fail on user input runs before anything is written):
model kind (config only) -> rows + columns + cell types -> tokenizer (+ chat template for
conversations) -> policy, reference -> LoRA -> train -> final/ (last, atomic).

Rows reach TRL in its own column names (``prompt``/``chosen``/``rejected``; KTO
``prompt``/``completion``/``label``). Conversations (lists of ``{role, content}``, ShareGPT
accepted) are normalised; a plain-text answer next to a conversational prompt becomes one
assistant turn. TRL applies the tokenizer's chat template to them, and that tokenizer (with its
template) is what final/ saves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import datasets
from transformers import set_seed

from mlsteps.context import StageContext, StageResult
from mlsteps.distributed import main_process_first
from mlsteps.engine import chat_data, lora
from mlsteps.engine.data import load_rows, require_columns, split_validation
from mlsteps.engine.inference import inspect_source, load_for_inference
from mlsteps.engine.modeling import (
    ensure_pad_token,
    load_tokenizer,
    loaded_metrics,
    loading_kwargs,
)
from mlsteps.engine.training import save_final, train
from mlsteps.errors import UserError
from mlsteps.recipe.specs.preference import PreferenceSpec

REWARD_CONVENTION = {
    "dpo": "DPO implicit reward beta*(log p(answer|prompt) - log p_ref(answer|prompt)), summed "
    "over answer tokens; reward_accuracy = share of pairs with chosen reward > rejected",
    "kto": "KTO implicit reward beta*(log p - log p_ref) over answer tokens, averaged over "
    "desirable (chosen) and undesirable (rejected) rows of a batch",
    "orpo": "ORPO reward beta*log-odds ratio of the mean per-token log-probability; "
    "reward_accuracy = share of pairs with chosen reward > rejected",
    "simpo": "SimPO reward beta*mean per-token log p(answer|prompt) (no reference); "
    "reward_accuracy = share of pairs with chosen reward > rejected",
}

_DIAGNOSTICS = ("logits_", "num_tokens", "entropy", "mean_token_accuracy")


def run(spec: PreferenceSpec, ctx: StageContext) -> StageResult:
    """Preference-tune ``spec.from_``; returns reward metrics and the final/ path."""
    where = f"stages.{ctx.stage}"
    source = ctx.resolve_source(spec.from_)
    info = _check_model(source, spec, f"{where}.from")
    if spec.reference_source is not None:
        _check_model(ctx.resolve_source(spec.reference_source), spec, f"{where}.reference")
    with main_process_first():
        train_rows, val_rows = _load_rows(spec, ctx, where)
    train_rows, conversational = to_trl_rows(train_rows, spec, where=f"{where}.data")
    if val_rows is not None:
        val_rows, _ = to_trl_rows(val_rows, spec, where=f"{where}.validation")
    if spec.method == "kto":
        train_rows = train_rows.shuffle(seed=ctx.seed, keep_in_memory=True)

    set_seed(ctx.seed)  # same seed, same LoRA init: a resumed run rebuilds the model it left
    loaded = load_for_inference(
        source, trust_remote_code=spec.trust_remote_code, where=where, loading=loading_kwargs(spec)
    )
    tokenizer = loaded.tokenizer
    if spec.tokenizer is not None:
        tokenizer = load_tokenizer(
            ctx.resolve_source(spec.tokenizer),
            trust_remote_code=spec.trust_remote_code,
            where=f"{where}.tokenizer",
        )
    ensure_pad_token(tokenizer)
    if conversational or spec.chat_template is not None:
        chat_data.set_template(tokenizer, spec.chat_template, where=f"{where}.chat_template")
    model = _policy(loaded.model, tokenizer)
    loaded_info = loaded_metrics(model, spec)
    ref_model = None
    if spec.method in ("dpo", "kto") and (spec.tuning == "full" or spec.reference_source):
        ref_source = ctx.resolve_source(spec.reference_source or spec.from_)
        ref = load_for_inference(
            ref_source,
            trust_remote_code=spec.trust_remote_code,
            where=where,
            loading=loading_kwargs(spec),
        )
        ref_model = _policy(ref.model, tokenizer)
        ref_model.requires_grad_(False)
    if spec.tuning == "lora":
        if info.adapter_source is not None and not spec.merge:
            raise UserError(
                f"'{spec.from_}' is a LoRA adapter; a new adapter on top of it would have no base "
                "model on disk",
                where=f"{where}.tuning",
                hint="set merge: true, or fine-tune the SFT stage with merge: true",
            )
        model = lora.wrap(model, spec.lora_spec, "causal_lm", where=f"{where}.lora.target_modules")
    model.config.use_cache = False

    trainer_cls, args_cls, overrides = _trainer(spec)
    kwargs = {"ref_model": ref_model} if spec.method in ("dpo", "kto") else {}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.log(
        f"{spec.method}/{spec.tuning}: {len(train_rows)} training rows, "
        f"{len(val_rows) if val_rows is not None else 0} validation, "
        f"{n_trainable:,} trainable parameters"
        + (", conversations (chat template applied)" if conversational else "")
    )
    outcome = train(
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=None,  # TRL's own preference collator
        spec=spec.train,
        ctx=ctx,
        trainer_cls=trainer_cls,
        args_cls=args_cls,
        args_overrides=overrides,
        trainer_kwargs=kwargs,
        group_by_length=False,  # TRL datasets carry no input_ids column to group by
        seq_len_for_mfu=spec.max_seq_len,
        eval_at_start=True,
    )
    # TRL's diagnostics (logit means, entropy, token counts) stay in metrics.jsonl only.
    metrics: dict[str, Any] = {
        k: v for k, v in outcome.metrics.items() if not any(n in k for n in _DIAGNOSTICS)
    }
    for key, value in outcome.initial_metrics.items():
        if key in ("val_reward_accuracy", "val_reward_margin", "val_loss"):
            metrics[f"{key}_start"] = value
    metrics.update(
        trainable_params=n_trainable,
        train_rows=len(train_rows),
        reward_convention=REWARD_CONVENTION[spec.method],
        **loaded_info,
    )
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's frozen copy of the adapter, not part of the result
    model.config.use_cache = True
    final = _save(spec, ctx, model, tokenizer, source, info, outcome.full_state_dict)
    return StageResult(metrics=metrics, outputs={"final": str(final)})


# ---------------------------------------------------------------- model


def _check_model(source: str, spec: PreferenceSpec, where: str) -> Any:
    """The source must be a causal LM (plain, or a LoRA adapter): checked on configs only."""
    info = inspect_source(source, trust_remote_code=spec.trust_remote_code, where=where)
    if info.kind != "clm":
        raise UserError(
            f"preference tuning needs a causal LM; '{source}' is a {info.kind} model",
            where=where,
            hint="point 'from' at a causal-LM stage (pretrain clm, finetune causal_lm/chat)",
        )
    if info.prompter is not None and info.prompter.method in ("prompt_tuning", "prefix_tuning"):
        raise UserError(
            f"'{source}' is a soft-prompt model; preference tuning trains model weights",
            where=where,
            hint="start from the model the prompt stage was trained on",
        )
    return info


def _policy(model: Any, tokenizer: Any) -> Any:
    """A model loaded for inference, made trainable: float32, embeddings fit the tokenizer."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # a builtin chat template added tokens
    model.train()
    return model


def _trainer(spec: PreferenceSpec) -> tuple[Any, Any, dict[str, Any]]:
    """(TRL trainer class, its config class, config values) for ``spec.method``."""
    common: dict[str, Any] = {
        "beta": spec.beta,
        "max_length": spec.max_seq_len,
        "dataset_num_proc": None,
    }
    if spec.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        common["loss_type"] = [spec.loss_type or "sigmoid"]
        if spec.sft_weight is not None:
            common["loss_type"].append("sft")
            common["loss_weights"] = [1.0, spec.sft_weight]
        common["precompute_ref_log_probs"] = False
        return DPOTrainer, DPOConfig, common
    if spec.method == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO's KL term pairs each row with its batch neighbours: TRL needs a fixed order (the
        # rows are shuffled once, with the recipe seed, in run()).
        common["train_sampling_strategy"] = "sequential"
        return KTOTrainer, KTOConfig, common
    if spec.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, common
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    common.update(loss_type="simpo", cpo_alpha=0.0)
    if spec.simpo_gamma is not None:
        common["simpo_gamma"] = spec.simpo_gamma
    return CPOTrainer, CPOConfig, common


# ---------------------------------------------------------------- data


def _load_rows(
    spec: PreferenceSpec, ctx: StageContext, where: str
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    rows = load_rows(spec.data, where=f"{where}.data", cache_dir=ctx.cache_dir)
    require_columns(rows, _columns(spec, rows), f"{where}.data")
    if spec.validation is not None:
        val = load_rows(spec.validation, where=f"{where}.validation", cache_dir=ctx.cache_dir)
        require_columns(val, _columns(spec, val), f"{where}.validation")
        return rows, val
    return split_validation(
        rows, spec.validation_fraction, ctx.seed, where=f"{where}.validation_fraction"
    )


def _columns(spec: PreferenceSpec, rows: datasets.Dataset) -> list[str]:
    if spec.method == "kto":
        return [spec.prompt_column, spec.completion_column, spec.label_column]
    pair = [spec.chosen_column, spec.rejected_column]
    if _implicit_prompt(spec, rows):
        return pair  # whole conversations: the prompt is their shared turns
    return [spec.prompt_column, *pair]


def _implicit_prompt(spec: PreferenceSpec, rows: datasets.Dataset) -> bool:
    """Pairs of whole conversations without a prompt column (trl-lib/ultrafeedback_binarized)."""
    return (
        spec.method != "kto"
        and spec.prompt_column not in rows.column_names
        and spec.chosen_column in rows.column_names
        and len(rows) > 0
        and chat_data.is_conversation(rows[0][spec.chosen_column])
    )


def to_trl_rows(
    rows: datasets.Dataset, spec: PreferenceSpec, *, where: str
) -> tuple[datasets.Dataset, bool]:
    """Rows in TRL's column names and types; (rows, conversational). UserError names the first
    bad cell. Conversational when the first prompt is a conversation; then every prompt must be."""
    if len(rows) == 0:
        raise UserError("no rows", where=where, hint="check the data source and its slices")
    if _implicit_prompt(spec, rows):
        return _split_conversations(rows, spec, where=where), True
    kto = spec.method == "kto"
    answer_cols = [spec.completion_column] if kto else [spec.chosen_column, spec.rejected_column]
    trl_answers = ["completion"] if kto else ["chosen", "rejected"]
    conversational = chat_data.is_conversation(rows[0][spec.prompt_column])
    out: dict[str, list[Any]] = {"prompt": [], **{name: [] for name in trl_answers}}
    if kto:
        out["label"] = []
    for i, row in enumerate(rows):
        prompt = row[spec.prompt_column]
        if conversational:
            out["prompt"].append(
                chat_data.normalize_messages(prompt, where=where, row=i, column=spec.prompt_column)
            )
        else:
            out["prompt"].append(_text(prompt, spec.prompt_column, i, where))
        for col, name in zip(answer_cols, trl_answers, strict=True):
            value = row[col]
            if conversational:
                turns = (
                    [{"role": "assistant", "content": _text(value, col, i, where)}]
                    if isinstance(value, str)
                    else chat_data.normalize_messages(value, where=where, row=i, column=col)
                )
                out[name].append(turns)
            else:
                out[name].append(_text(value, col, i, where))
        if kto:
            out["label"].append(_label(row[spec.label_column], spec.label_column, i, where))
    return datasets.Dataset.from_dict(out), conversational


def _split_conversations(rows: datasets.Dataset, spec: PreferenceSpec, *, where: str) -> Any:
    out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        good, bad = (
            chat_data.normalize_messages(row[col], where=where, row=i, column=col)
            for col in (spec.chosen_column, spec.rejected_column)
        )
        prompt, good, bad = chat_data.split_pair(good, bad)
        if not prompt or not good or not bad:
            raise UserError(
                f"row {i}: columns '{spec.chosen_column}' and '{spec.rejected_column}' share no "
                "opening turns, so there is no prompt to find",
                where=where,
                hint=f"give a '{spec.prompt_column}' column, or conversations that differ only "
                "in the final answer",
            )
        out["prompt"].append(prompt)
        out["chosen"].append(good)
        out["rejected"].append(bad)
    return datasets.Dataset.from_dict(out)


def _text(value: Any, column: str, row: int, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        kind = "empty text" if isinstance(value, str) else type(value).__name__
        raise UserError(
            f"column '{column}' row {row} is {kind}, expected text",
            where=where,
            hint="every prompt and answer must be non-empty text (or, for the prompt, a "
            "conversation)",
        )
    return value


def _label(value: Any, column: str, row: int, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(
        f"column '{column}' row {row} is {value!r}, expected true or false",
        where=where,
        hint="kto labels say whether the completion is desirable: true or false",
    )


# ---------------------------------------------------------------- final/


def _save(
    spec: PreferenceSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    source: str,
    info: Any,
    state_dict: dict[str, Any] | None,
) -> Path:
    adapter = spec.tuning == "lora" and not spec.merge
    extra = _prompter_file(info, ctx, base=source if adapter else "", adapter=adapter)
    if spec.tuning == "lora" and spec.merge:
        return save_final(lora.merge(model), tokenizer, ctx, extra_files=extra)
    if adapter:
        model.peft_config["default"].base_model_name_or_path = source
        info_json = {"base_model_name_or_path": source, "task": "causal_lm"}
        extra["mlsteps_adapter.json"] = json.dumps(info_json, indent=1)
    return save_final(model, tokenizer, ctx, extra_files=extra, state_dict=state_dict)


def _prompter_file(info: Any, ctx: StageContext, *, base: str, adapter: bool) -> dict[str, str]:
    """The SFT model's prompt template (mlsteps_prompt.json) carried over, so eval/predict build
    inputs for the tuned model exactly as for its start."""
    from mlsteps.prompt.prompter import prompt_file

    prompter = info.prompter
    if prompter is None or prompter.method != "finetune":
        return {}
    prompter = dataclasses.replace(prompter, base_model=base, has_adapter=adapter)
    return prompt_file(prompter, ctx.final_dir)

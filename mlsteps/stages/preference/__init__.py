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
from typing import TYPE_CHECKING, Any

import datasets
from transformers import set_seed

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.distributed import main_process_first
from mlsteps.engine import chat_data, lora
from mlsteps.engine.inference import inspect_source, load_for_inference
from mlsteps.engine.modeling import (
    ensure_pad_token,
    load_tokenizer,
    loaded_metrics,
    loading_kwargs,
)
from mlsteps.engine.training import TrainRequest, save_final, train
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.preference import PreferenceSpec
from mlsteps.stages.preference.data import load_rows_and_validation, to_trl_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["REWARD_CONVENTION", "run", "to_trl_rows"]

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


@stage_entry
def run(spec: PreferenceSpec, ctx: StageContext) -> StageResult:
    """Preference-tune ``spec.from_``; returns reward metrics and the final/ path."""
    source = ctx.resolve_source(spec.from_)
    with field_scope("from"):
        info = _check_model(source, spec)
    if spec.reference_source is not None:
        reference = ctx.resolve_source(spec.reference_source)
        with field_scope("reference"):
            _check_model(reference, spec)
    train_rows, val_rows, conversational = _trl_data(spec, ctx)

    set_seed(ctx.seed)  # same seed, same LoRA init: a resumed run rebuilds the model it left
    loaded = load_for_inference(
        source, trust_remote_code=spec.trust_remote_code, model_field=HERE,
        loading=loading_kwargs(spec),
    )  # fmt: skip
    tokenizer = _tokenizer(spec, ctx, loaded.tokenizer, conversational)
    model = _policy(loaded.model, tokenizer)
    loaded_info = loaded_metrics(model, spec)
    ref_model = _reference(spec, ctx, tokenizer)
    if spec.tuning == "lora":
        model = _wrap_lora(spec, info, model)
    model.config.use_cache = False

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.log(
        f"{spec.method}/{spec.tuning}: {len(train_rows)} training rows, "
        f"{len(val_rows) if val_rows is not None else 0} validation, "
        f"{n_trainable:,} trainable parameters"
        + (", conversations (chat template applied)" if conversational else "")
    )
    outcome = train(_train_request(spec, ctx, model, tokenizer, train_rows, val_rows, ref_model))
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


def _trl_data(
    spec: PreferenceSpec, ctx: StageContext
) -> tuple[datasets.Dataset, datasets.Dataset | None, bool]:
    """Training and validation rows in TRL's columns, and whether they are conversations."""
    with main_process_first():
        train_rows, val_rows = load_rows_and_validation(spec, ctx)
    with field_scope("data"):
        train_rows, conversational = to_trl_rows(train_rows, spec)
    if val_rows is not None:
        with field_scope("validation"):
            val_rows, _ = to_trl_rows(val_rows, spec)
    if spec.method == "kto":
        train_rows = train_rows.shuffle(seed=ctx.seed, keep_in_memory=True)
    return train_rows, val_rows, conversational


def _train_request(
    spec: PreferenceSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: datasets.Dataset,
    val_rows: datasets.Dataset | None,
    ref_model: Any,
) -> TrainRequest:
    trainer_cls, args_cls, overrides = _trainer(spec)
    return TrainRequest(
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
        trainer_kwargs={"ref_model": ref_model} if spec.method in ("dpo", "kto") else {},
        group_by_length=False,  # TRL datasets carry no input_ids column to group by
        seq_len_for_mfu=spec.max_seq_len,
        eval_at_start=True,
    )


# ---------------------------------------------------------------- model


def _check_model(source: str, spec: PreferenceSpec) -> Any:
    """The source must be a causal LM (plain, or a LoRA adapter): checked on configs only.
    Errors are about the model field the caller scopes this to."""
    info = inspect_source(source, trust_remote_code=spec.trust_remote_code)
    if info.kind != "clm":
        raise UserError(
            f"preference tuning needs a causal LM; '{source}' is a {info.kind} model",
            field=HERE,
            hint="point 'from' at a causal-LM stage (pretrain clm, finetune causal_lm/chat)",
        )
    if info.prompter is not None and info.prompter.method in ("prompt_tuning", "prefix_tuning"):
        raise UserError(
            f"'{source}' is a soft-prompt model; preference tuning trains model weights",
            field=HERE,
            hint="start from the model the prompt stage was trained on",
        )
    return info


def _policy(model: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
    """A model loaded for inference, made trainable: float32, embeddings fit the tokenizer."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # a builtin chat template added tokens
    model.train()
    return model


def _tokenizer(
    spec: PreferenceSpec,
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    conversational: bool,
) -> Any:
    """The model's tokenizer (or ``tokenizer:``) with a pad token and, for conversations, the
    chat template TRL applies."""
    if spec.tokenizer is not None:
        tok_source = ctx.resolve_source(spec.tokenizer)  # an unreachable hub: the stage's error
        with field_scope("tokenizer"):
            tokenizer = load_tokenizer(tok_source, trust_remote_code=spec.trust_remote_code)
    ensure_pad_token(tokenizer)
    if conversational or spec.chat_template is not None:
        with field_scope("chat_template"):
            chat_data.set_template(tokenizer, spec.chat_template)
    return tokenizer


def _reference(spec: PreferenceSpec, ctx: StageContext, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The frozen reference model DPO/KTO compare against, when it is not the LoRA base itself
    (None: TRL uses the policy with its adapter disabled, or the method needs none)."""
    if spec.method not in ("dpo", "kto") or not (spec.tuning == "full" or spec.reference_source):
        return None
    ref_source = ctx.resolve_source(spec.reference_source or spec.from_)
    ref = load_for_inference(
        ref_source,
        trust_remote_code=spec.trust_remote_code,
        model_field=HERE,
        loading=loading_kwargs(spec),
    )
    ref_model = _policy(ref.model, tokenizer)
    ref_model.requires_grad_(False)
    return ref_model


def _wrap_lora(spec: PreferenceSpec, info: Any, model: Any) -> Any:
    if info.adapter_source is not None and not spec.merge:
        raise UserError(
            f"'{spec.from_}' is a LoRA adapter; a new adapter on top of it would have no base "
            "model on disk",
            field="tuning",
            hint="set merge: true, or fine-tune the SFT stage with merge: true",
        )
    with field_scope("lora.target_modules"):
        return lora.wrap(model, spec.lora_spec, "causal_lm")


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


# ---------------------------------------------------------------- final/


def _save(
    spec: PreferenceSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
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

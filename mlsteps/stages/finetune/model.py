"""The model a fine-tune trains and how final/ holds it: built or loaded for the task (checked on
its config first), its task head and pad id, and the saved model, merged LoRA or adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import set_seed
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from mlsteps.context import StageContext
from mlsteps.engine import lora
from mlsteps.engine.modeling import build_model, load_config, load_model, loading_kwargs
from mlsteps.engine.training import save_final
from mlsteps.errors import HERE, UserError, field_scope
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.recipe.specs.model import ENCODER_ONLY_FAMILIES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


# ---------------------------------------------------------------- model


def model(
    spec: FinetuneSpec,
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    source: str | None,
    label2id: dict[str, int] | None,
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
            model_task(spec),
            num_labels=kwargs.get("num_labels"),
            model_field="model",
            attn_implementation=spec.attn_implementation,
        )
        if label2id is not None:
            model.config.id2label, model.config.label2id = kwargs["id2label"], label2id
    else:
        assert source is not None
        with field_scope("from"):
            config = load_config(source, trust_remote_code=spec.trust_remote_code)
            # Checked on the config, before any weights are downloaded or read.
            _check_task(spec, config)
        # A checkpoint already fine-tuned on other classes has a head of another shape.
        extra = {**kwargs, "ignore_mismatched_sizes": True} if label2id is not None else {}
        model = load_model(
            source,
            model_task(spec),
            trust_remote_code=spec.trust_remote_code,
            model_field="from",
            loading_info=loading_info,
            **loading_kwargs(spec),
            **extra,
        )
    config = model.config
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        # Sequence classification on decoders picks the last non-pad token: it needs the pad id.
        config.pad_token_id = tokenizer.pad_token_id
    return model


def _check_task(spec: FinetuneSpec, config: Any) -> None:
    """UserError when the pretrained model cannot do the task (its config says so)."""
    model_type = getattr(config, "model_type", "?")
    if spec.task == "seq2seq" and not getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"task seq2seq needs an encoder-decoder model; {model_type} is not one",
            field=HERE,
            hint="use a t5 or bart model, or task causal_lm with a template",
        )
    if spec.task in ("causal_lm", "chat") and model_type in _ENCODER_ONLY:
        raise UserError(
            f"task {spec.task} needs a decoder model; {model_type} is an encoder",
            field=HERE,
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
            field=HERE,
            hint="use an encoder (bert, roberta), a decoder (gpt2, llama) or t5/bart",
        )


# ---------------------------------------------------------------- final/


def save(
    spec: FinetuneSpec,
    ctx: StageContext,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
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
        info: dict[str, Any] = {"base_model_name_or_path": source, "task": model_task(spec)}
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


def model_task(spec: FinetuneSpec) -> str:
    """The model class a task trains: a chat model is a causal LM."""
    return "causal_lm" if spec.task == "chat" else spec.task

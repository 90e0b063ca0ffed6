"""LoRA via peft: per-family target defaults, target checks, wrapping and merging."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from mlsteps.errors import HERE, UserError
from mlsteps.recipe.specs.model import LoraSpec

# Attention projections per model_type (the usual LoRA choice). gpt2's c_proj exists in both the
# attention and the MLP block; adapting both is the common recipe for gpt2.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "modernbert": ["Wqkv", "Wo"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

TASK_TYPES = {
    "classification": TaskType.SEQ_CLS,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
    "causal_lm": TaskType.CAUSAL_LM,
}

_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)


def _adaptable_names(model: torch.nn.Module) -> list[str]:
    """Full names of the layers LoRA can wrap (Linear, Embedding, gpt2's Conv1D)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _ADAPTABLE) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def default_targets(model: torch.nn.Module) -> list[str]:
    """Target modules for the model's family; peft's own table for families we do not list."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise UserError(
        f"no default LoRA target modules for model type '{model_type}'",
        field=HERE,
        hint="set lora.target_modules, e.g. to " + ", ".join(_leaf_suffixes(model)[:12]),
    )


def _leaf_suffixes(model: torch.nn.Module) -> list[str]:
    """Distinct last name components of adaptable layers, in model order."""
    seen: list[str] = []
    for name in _adaptable_names(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in seen:
            seen.append(leaf)
    return seen


def head_modules(model: torch.nn.Module) -> list[str]:
    """Task-head children (classifier, score, classification_head ...): everything at the top
    level except the backbone. They are new and must be trained and saved with the adapter."""
    backbone = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def _key_name(key: Any) -> str:
    # transformers reports a mismatched key as (name, checkpoint shape, model shape).
    return str(key[0] if isinstance(key, tuple | list) else key)


def new_modules(model: torch.nn.Module, loading_info: dict[str, Any] | None) -> list[str]:
    """Modules whose parameters the loaded checkpoint did not hold: transformers initialised
    them at random (a pooler missing from an MLM checkpoint, a new classification head, a
    head of another shape). An adapter that does not save them cannot be reloaded: every load
    would draw them again. Each is named by its highest ancestor whose parameters are all new
    (``bert.pooler``, ``classifier``); parameters tied to loaded ones (an output embedding
    sharing the input table) are not new."""
    if not loading_info:
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = {_key_name(k) for k in loading_info.get("missing_keys") or ()}
    missing |= {_key_name(k) for k in loading_info.get("mismatched_keys") or ()}
    missing &= set(params)
    loaded_ids = {id(p) for name, p in params.items() if name not in missing}
    new = {name for name in missing if id(params[name]) not in loaded_ids}
    if not new:
        return []
    modules = dict(model.named_modules())

    def all_new(prefix: str) -> bool:
        return all(
            f"{prefix}.{name}" in new
            for name, _ in modules[prefix].named_parameters(remove_duplicate=False)
        )

    found: list[str] = []
    for name in sorted(new):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if not owner:
            continue  # a parameter of the model itself: no module to save (not in any family)
        parts = owner.split(".")
        top = owner
        for k in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:k])
            if not all_new(ancestor):
                break
            top = ancestor
        if top not in found:
            found.append(top)
    return _outermost(found)


def _outermost(names: list[str]) -> list[str]:
    """Drop names inside another listed module (peft cannot wrap a module and its child)."""
    return [m for m in names if not any(m.startswith(o + ".") for o in names)]


def check_targets(model: torch.nn.Module, targets: list[str], *, exclude: list[str]) -> None:
    """Every target must match at least one layer (peft rule: the full name or a '.'-suffix)."""
    names = [
        n
        for n in _adaptable_names(model)
        if not any(n == e or n.startswith(e + ".") for e in exclude)
    ]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(
            f"LoRA target modules match no layer of the model: {', '.join(missing)}",
            field=HERE,
            hint="layers that exist: " + ", ".join(_leaf_suffixes(model)[:30]),
        )


def wrap(
    model: Any,
    spec: LoraSpec,
    task: str,
    *,
    loading_info: dict[str, Any] | None = None,
    kbit: bool = False,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Freeze the model and add LoRA adapters, plus a trainable copy, saved with the adapter
    (peft ``modules_to_save``), of the task head and of every module the load initialised
    (``loading_info`` from :func:`mlsteps.engine.modeling.load_model`, see :func:`new_modules`).

    ``kbit``: the model was loaded quantized (QLoRA); peft's prepare_model_for_kbit_training
    casts its unquantized layers to fp32 and enables input gradients first. Errors are about
    the target modules: callers scope them (``lora.target_modules``)."""
    targets: list[str] | str
    if spec.target_modules == "all-linear":
        targets = "all-linear"  # peft's rule: every linear layer except the output head
    else:
        targets = list(spec.target_modules) if spec.target_modules else default_targets(model)
    heads = head_modules(model) if task == "classification" else []
    heads = _outermost(list(dict.fromkeys(heads + new_modules(model, loading_info))))
    if isinstance(targets, list):
        check_targets(model, targets, exclude=heads)
    if kbit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    config = LoraConfig(
        task_type=TASK_TYPES[task],
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft computes alpha / r in floats
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        # gpt2 stores its projections as Conv1D with transposed weights.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    peft_model = get_peft_model(model, config)
    _train_in_fp32(peft_model)
    return peft_model


_HALF = (torch.float16, torch.bfloat16)


def _to_fp32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.dtype in _HALF else a for a in args)


def _train_in_fp32(model: torch.nn.Module) -> None:
    """Weights that train stay fp32 on a half-precision base (model_dtype bf16/fp16; the rule of
    recipe/specs/loading.py). peft keeps LoRA weights in fp32 and casts their input itself
    (autocast_adapter_dtype); the trained copies of heads (modules_to_save) would otherwise
    train in the base's half type: they get fp32 weights and an input cast."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype in _HALF]
        if not own:
            continue
        for param in own:
            param.data = param.data.float()
        module.register_forward_pre_hook(_to_fp32)


def merge(model: PeftModel) -> Any:
    """Fold the LoRA weights into the base layers; returns the plain transformers model."""
    return model.merge_and_unload()

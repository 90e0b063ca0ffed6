"""Load any model source for inference: a plain model, a peft adapter, or a prompted model.

A source is a local directory or a hub id (``ctx.resolve_source`` has already mapped stage
names to ``final/`` directories). Three kinds of directory are understood:

- a plain transformers model (``config.json``);
- a peft adapter (``adapter_config.json``): the base model it names (path or hub id) is loaded
  and the adapter applied; LoRA-style adapters are merged for speed, soft prompts stay peft;
- a prompted model written by the prompt stage (``mlsteps_prompt.json``, see
  :mod:`mlsteps.prompt.prompter`): its ``Prompter`` renders rows into prompts; the weights are the
  adapter in the same directory, or else the model its ``base_model`` names.

The kind ('clm', 'mlm', 'seq2seq', 'classification') comes from ``config.architectures``, then
the model type, then the adapter's task type. Models are loaded in fp32, on CUDA when available.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlsteps.errors import HERE, UserError, field_scope, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ModelKind = Literal["clm", "mlm", "seq2seq", "classification"]
_PEFT_TASKS: dict[str, ModelKind] = {
    "CAUSAL_LM": "clm",
    "SEQ_2_SEQ_LM": "seq2seq",
    "SEQ_CLS": "classification",
}


@dataclass
class SourceInfo:
    """What a source is, found without loading weights."""

    source: str
    kind: ModelKind
    model_source: str  # plain model to load (a base model for adapters)
    adapter_source: str | None
    prompter: Any | None  # mlsteps.prompt.prompter.Prompter
    config: Any


@dataclass
class Loaded:
    """A model ready for inference (eval mode) with its tokenizer, kind and optional prompter."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    prompter: Any | None = None
    source: str = ""
    # The model files loaded as they are (no adapter, no soft prompt), else "": two loads with the
    # same value have the same weights (the eval stage reuses label scores across them).
    weights: str = ""


def _load_prompter(directory: Path) -> Any | None:
    try:
        from mlsteps.prompt.prompter import load_prompter
    except ImportError:  # prompt support not installed in this build: plain directories only
        return None
    return load_prompter(directory)


def kind_from_config(config: Any) -> ModelKind | None:
    """Model kind from ``config.architectures``, falling back to the model type."""
    from transformers.models.auto import modeling_auto as auto

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "mlm"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "clm"
        if arch.endswith("ForConditionalGeneration") and getattr(
            config, "is_encoder_decoder", False
        ):
            return "seq2seq"
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return (
            "seq2seq" if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES else None
        )
    # BERT-like types are in both mappings; they are masked LMs unless configured as decoders.
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    ):
        return "mlm"
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    return None


def _auto_config(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    from mlsteps.engine.files import check_model_dir

    check_model_dir(source)  # a damaged file is named, not a raw library error
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load model '{source}': {first_line(exc)}",
            field=HERE,
            hint="give an earlier stage, a model directory or a reachable hub id",
        ) from None


def inspect_source(source: str, *, trust_remote_code: bool = False) -> SourceInfo:
    """Classify ``source`` and find what to load, reading configs only (no weights).

    Errors are about the model field the caller scopes this to (``models.0``).
    """
    from mlsteps.engine.files import check_model_dir

    check_model_dir(source)  # the adapter or prompt directory itself
    path = Path(source)
    prompter = _load_prompter(path) if path.is_dir() else None
    adapter_cfg: dict[str, Any] | None = None
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    elif not path.is_dir():
        try:
            from peft import PeftConfig

            adapter_cfg = PeftConfig.from_pretrained(source).to_dict()
        except Exception:  # not an adapter repo (or offline): treat as a plain model id
            adapter_cfg = None
    if adapter_cfg is not None:
        base = (prompter.base_model if prompter is not None else "") or _adapter_base(
            path, adapter_cfg
        )
        if not base:
            raise UserError(f"adapter '{source}' names no base model", field=HERE)
        config = _auto_config(str(base), trust_remote_code)
        task = str(adapter_cfg.get("task_type") or "")
        kind = _PEFT_TASKS.get(task) or kind_from_config(config)
        model_source, adapter_source = str(base), source
    elif path.is_dir() and not (path / "config.json").is_file() and prompter is not None:
        if not prompter.base_model:
            raise UserError(f"prompted model '{source}' names no base model", field=HERE)
        config = _auto_config(prompter.base_model, trust_remote_code)
        kind = kind_from_config(config)
        model_source, adapter_source = prompter.base_model, None
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(
                f"'{source}' is not a model directory (no config.json or adapter_config.json)",
                field=HERE,
                hint="point at a stage's final/ directory",
            )
        config = _auto_config(source, trust_remote_code)
        kind = kind_from_config(config)
        model_source, adapter_source = source, None
    if kind is None:
        raise UserError(
            f"cannot tell what kind of model '{source}' is (architectures "
            f"{getattr(config, 'architectures', None)}, type {getattr(config, 'model_type', '?')})",
            field=HERE,
            hint="use a causal LM, masked LM, seq2seq or sequence-classification model",
        )
    return SourceInfo(source, kind, model_source, adapter_source, prompter, config)


def _adapter_base(path: Path, adapter_cfg: dict[str, Any]) -> str:
    """The base model of an adapter: the path (or hub id) in adapter_config.json, or, when that
    path is gone (the run directory was moved or copied), the path relative to the adapter that
    the finetune stage records in mlsteps_adapter.json."""
    base = str(adapter_cfg.get("base_model_name_or_path") or "")
    meta_path = path / "mlsteps_adapter.json"
    if base and Path(base).is_absolute() and not Path(base).exists() and meta_path.is_file():
        relative = json.loads(meta_path.read_text(encoding="utf-8")).get("base_model_relative")
        if relative and (path / relative).is_dir():
            return str((path / relative).resolve())
    return base


def _model_class(kind: ModelKind) -> Any:
    import transformers

    return {
        "clm": transformers.AutoModelForCausalLM,
        "mlm": transformers.AutoModelForMaskedLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[kind]


def _has_tokenizer(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def load_for_inference(
    source: str,
    *,
    trust_remote_code: bool = False,
    model_field: str = HERE,
    loading: dict[str, Any] | None = None,
) -> Loaded:
    """Load ``source`` (plain model, peft adapter or prompted model) for inference.

    Errors are at ``model_field`` (relative to the stage: ``models.0``), a kernel that fails at
    the stage's attn_implementation.

    ``loading``: from_pretrained keyword arguments of the stage's model-loading fields
    (engine.modeling.loading_kwargs: dtype, attn_implementation); fp32 weights by default."""
    import torch
    from transformers import AutoTokenizer

    with field_scope(model_field):
        info = inspect_source(source, trust_remote_code=trust_remote_code)
    try:
        model = _model_class(info.kind).from_pretrained(
            info.model_source,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle a pytorch_model.bin
            **{"dtype": torch.float32, **(loading or {})},
            **_adapter_head_config(info, trust_remote_code),
        )
    except (ValueError, ImportError) as exc:
        from mlsteps.engine.modeling import attn_error

        raise attn_error(exc, (loading or {}).get("attn_implementation")) from exc
    except OSError as exc:
        first = first_line(exc)
        raise UserError(
            f"cannot load model weights from {info.model_source!r}: {first}",
            field=model_field,
            hint="mlsteps loads weights only from safetensors files; convert a pickled checkpoint "
            "with save_pretrained(..., safe_serialization=True)",
        ) from exc
    if info.adapter_source is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, info.adapter_source)
        if not model.active_peft_config.is_prompt_learning:
            # A merged LoRA model is a plain transformers model: faster and simpler downstream.
            model = model.merge_and_unload()
    tokenizer_source = next(
        (s for s in (info.adapter_source, source) if s and _has_tokenizer(s)), info.model_source
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    if info.prompter is not None and info.prompter.chat:
        info.prompter.use_chat_template(tokenizer)  # the template saved with the prompted model
    weights = "" if info.adapter_source is not None else info.model_source
    if weights and Path(weights).exists():
        weights = str(Path(weights).resolve())
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        kind=info.kind,
        prompter=info.prompter,
        source=source,
        weights=weights,
    )


def _adapter_head_config(info: SourceInfo, trust_remote_code: bool) -> dict[str, Any]:
    """A classification adapter has no config.json: its label map lives in the
    ``mlsteps_adapter.json`` the finetune stage writes, and the base must be built with it,
    or the head would load with the base's default 2 unnamed labels."""
    if info.adapter_source is None:
        return {}
    meta_path = Path(info.adapter_source) / "mlsteps_adapter.json"
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "num_labels" not in meta:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        info.model_source,
        trust_remote_code=trust_remote_code,
        num_labels=int(meta["num_labels"]),
        id2label={int(k): v for k, v in meta["id2label"].items()},
        label2id={k: int(v) for k, v in meta["label2id"].items()},
    )
    return {"config": config}


def _score_batches(items: list[Any], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` (token lists) in length-sorted batches, longest first."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict_labels(loaded: Loaded, texts: list[str], *, batch_size: int) -> list[str]:
    """Arg-max label of a sequence-classification model for each text, in input order.

    Labels are the model's ``id2label`` names; ids as text when it has only generic names.
    """
    return [label for label, _ in classify(loaded, texts, batch_size=batch_size)]


def classify(
    loaded: Loaded, texts: list[str], *, batch_size: int
) -> list[tuple[str, dict[str, float]]]:
    """(arg-max label, {label: probability}) of a sequence-classification model for each text,
    in input order; probabilities are the softmax of the logits (computed in float64)."""
    import torch

    from mlsteps.positions import max_positions

    if not texts:
        return []
    model, tokenizer = loaded.model, loaded.tokenizer
    caps = [
        c
        for c in (getattr(tokenizer, "model_max_length", None), max_positions(model))
        if isinstance(c, int)
    ]
    # Truncation by the tokenizer keeps the closing special token ([SEP], </s>) of long inputs.
    encoded = [
        list(ids)
        for ids in tokenizer(texts, truncation=bool(caps), max_length=min(caps) if caps else None)[
            "input_ids"
        ]
    ]
    # Decoder classifiers find the last real token through config.pad_token_id: without one,
    # padded batches are impossible, so score one row at a time.
    pad_id = model.config.pad_token_id
    if pad_id is None:
        batch_size, pad_id = 1, 0
    device = next(model.parameters()).device
    probs: list[list[float]] = [[] for _ in texts]
    with torch.no_grad():
        for batch in _score_batches(encoded, batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            p = torch.softmax(logits.double(), dim=-1).cpu()
            for row, i in enumerate(batch):
                probs[i] = p[row].tolist()
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    generic = all(name == f"LABEL_{i}" for i, name in id2label.items())
    names = [str(k) if generic else id2label.get(k, str(k)) for k in range(len(probs[0]))]
    out = []
    for dist in probs:
        best = max(range(len(dist)), key=dist.__getitem__)  # first maximum, like argmax
        out.append((names[best], dict(zip(names, dist, strict=True))))
    return out

"""Build a model from an ArchSpec or load one (and its tokenizer) from a stage, directory or hub id.

Vocabulary size and special-token ids of a new model always come from its tokenizer, so a model
built here and the tokenizer it was built for agree by construction. ``trust_remote_code`` is only
passed to transformers when the recipe asks for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    ModernBertConfig,
    PretrainedConfig,
    RobertaConfig,
    T5Config,
)

from mlsteps.engine.files import check_model_dir
from mlsteps.errors import HERE, UserError, field_scope, first_line
from mlsteps.positions import max_positions  # the one rule; stages import it from here too
from mlsteps.recipe.specs.model import ENCODER_ONLY_FAMILIES, ArchSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Stage tasks -> Auto classes. "causal_lm" is the finetune spelling of "clm".
_AUTO_CLASSES: dict[str, Any] = {
    "clm": AutoModelForCausalLM,
    "causal_lm": AutoModelForCausalLM,
    "mlm": AutoModelForMaskedLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "classification": AutoModelForSequenceClassification,
}
_FAMILIES_FOR_TASK = {
    "clm": ("gpt2", "llama"),
    "causal_lm": ("gpt2", "llama"),
    "mlm": ENCODER_ONLY_FAMILIES,
    "seq2seq": ("t5", "bart"),
    "classification": ("gpt2", "llama", *ENCODER_ONLY_FAMILIES, "t5", "bart"),
}


def _auto_class(task: str) -> Any:
    try:
        return _AUTO_CLASSES[task]
    except KeyError:
        raise ValueError(
            f"unknown task {task!r}; expected one of {sorted(_AUTO_CLASSES)}"
        ) from None


def _remote_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    # Only mention the flag when the recipe asked for it: transformers' default stays in force.
    return {"trust_remote_code": True} if trust_remote_code else {}


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer (fast where available) from a stage's final dir, a directory or a hub id;
    errors are about the field the caller scopes this to."""
    check_model_dir(source)  # a damaged file is named, not a raw library error
    try:
        return AutoTokenizer.from_pretrained(source, **_remote_kwargs(trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"cannot load a tokenizer from {source!r}: {first_line(exc)}",
            field=HERE,
            hint="give an earlier tokenizer stage, a directory with tokenizer.json, or a hub id",
        ) from exc


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; decoder tokenizers often lack one, so reuse EOS (GPT-2 habit)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos": bos, "eos": eos, "pad": pad}


def _config_for(arch: ArchSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    vocab_size = len(tokenizer)
    ids = _special_ids(tokenizer)
    ffn = arch.intermediate_size or 4 * arch.hidden_size
    common: dict[str, Any] = {
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    if arch.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=arch.max_positions, n_embd=arch.hidden_size,
            n_layer=arch.n_layers, n_head=arch.n_heads, n_inner=ffn, resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout, attn_pdrop=arch.dropout, **common,
        )  # fmt: skip
    if arch.family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden_size, intermediate_size=ffn,
            num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads,
            num_key_value_heads=arch.n_heads, max_position_embeddings=arch.max_positions,
            attention_dropout=arch.dropout, **common,
        )  # fmt: skip
    if arch.family == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.n_layers,
            num_attention_heads=arch.n_heads, intermediate_size=ffn,
            max_position_embeddings=arch.max_positions, hidden_dropout_prob=arch.dropout,
            attention_probs_dropout_prob=arch.dropout, **common,
        )  # fmt: skip
    if arch.family == "modernbert":
        # Pre-norm and rotary positions: a small model leaves the unigram plateau of MLM in a few
        # hundred steps where bert (post-norm, learned absolute positions) needs thousands
        # (docs/quickstart.md). sparse_prediction computes the MLM head only at the masked
        # positions (15% of them): same loss, 2.5x cheaper steps at a 4,000-token vocabulary.
        # Mean pooling for classification: MLM never trains the [CLS] position as a target.
        return ModernBertConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden_size, intermediate_size=ffn,
            num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads,
            max_position_embeddings=arch.max_positions, attention_dropout=arch.dropout,
            mlp_dropout=arch.dropout, embedding_dropout=arch.dropout,
            cls_token_id=ids["bos"], sep_token_id=ids["eos"], sparse_prediction=True,
            classifier_pooling="mean", **common,
        )  # fmt: skip
    if arch.family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so the table needs that many extra rows.
        pad = ids["pad"] or 0
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.n_layers,
            num_attention_heads=arch.n_heads, intermediate_size=ffn,
            max_position_embeddings=arch.max_positions + pad + 1,
            hidden_dropout_prob=arch.dropout, attention_probs_dropout_prob=arch.dropout, **common,
        )  # fmt: skip
    if arch.family == "t5":
        t5 = T5Config(
            vocab_size=vocab_size, d_model=arch.hidden_size, d_kv=arch.hidden_size // arch.n_heads,
            d_ff=ffn, num_layers=arch.n_layers, num_decoder_layers=arch.n_layers,
            num_heads=arch.n_heads, dropout_rate=arch.dropout, pad_token_id=ids["pad"],
            eos_token_id=ids["eos"],
        )  # fmt: skip
        t5.decoder_start_token_id = ids["pad"]  # T5 convention: decoding starts from pad
        return t5
    if arch.family == "bart":
        return BartConfig(
            vocab_size=vocab_size, d_model=arch.hidden_size, encoder_layers=arch.n_layers,
            decoder_layers=arch.n_layers, encoder_attention_heads=arch.n_heads,
            decoder_attention_heads=arch.n_heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_position_embeddings=arch.max_positions, dropout=arch.dropout,
            decoder_start_token_id=ids["eos"], forced_eos_token_id=ids["eos"], **common,
        )  # fmt: skip
    raise ValueError(f"unknown family {arch.family}")


def build_model(
    arch: ArchSpec,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    *,
    num_labels: int | None = None,
    model_field: str = HERE,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A freshly initialised model of ``arch.family`` for ``task`` (clm, mlm, seq2seq, classification).

    Seed the RNG before calling (``transformers.set_seed``) for reproducible initial weights.
    A new model is always fp32: its weights train (see recipe/specs/loading.py). Errors are at
    ``model_field`` (relative to the stage), a kernel that fails at attn_implementation.
    """
    allowed = _FAMILIES_FOR_TASK.get(task)
    if allowed is None:
        raise ValueError(f"unknown task {task!r}")
    if arch.family not in allowed:
        raise UserError(
            f"model family {arch.family} cannot do {task}",
            field=model_field,
            hint=f"use one of {', '.join(allowed)}",
        )
    config = _config_for(arch, tokenizer)
    if num_labels is not None:
        config.num_labels = num_labels
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = _auto_class(task).from_config(config, **attn)
    except (ValueError, ImportError) as exc:
        raise attn_error(exc, attn_implementation) from exc
    return _name_causal_loss(model, task)


def loading_kwargs(spec: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from a stage spec's model-loading fields
    (``model_dtype``, ``attn_implementation``, ``quantization``; absent fields: the defaults).
    ``auto`` is fp32: the master copy mixed precision trains from (recipe/specs/loading.py)."""
    from mlsteps.recipe.specs.loading import TORCH_DTYPES

    dtype = getattr(spec, "model_dtype", "auto")
    out: dict[str, Any] = {"dtype": getattr(torch, TORCH_DTYPES.get(dtype, "float32"))}
    attn = getattr(spec, "attn_implementation", None)
    if attn:
        out["attn_implementation"] = attn
    quant = getattr(spec, "quantization", None)
    if quant is not None:
        from transformers import BitsAndBytesConfig  # needs bitsandbytes only when used

        bnb = quant.bnb_kwargs()
        if "bnb_4bit_compute_dtype" in bnb:
            bnb["bnb_4bit_compute_dtype"] = getattr(torch, bnb["bnb_4bit_compute_dtype"])
        out["quantization_config"] = BitsAndBytesConfig(**bnb)
        # k-bit weights are made on the GPU, each process on its own one (torchrun's LOCAL_RANK);
        # the run-start check (recipe/specs/loading.check_devices) refused a machine without CUDA.
        out["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return out


def loaded_metrics(model: Any, spec: Any) -> dict[str, str]:
    """What the stage record says about how the model was loaded: the weights' dtype, the
    attention kernel transformers chose (``sdpa`` when the recipe left it unset) and the
    quantization."""
    config = getattr(model, "config", None)
    out = {"model_dtype": str(getattr(model, "dtype", "")).removeprefix("torch.")}
    attn = getattr(config, "_attn_implementation", None)
    if attn:
        out["attn_implementation"] = str(attn)
    quant = getattr(spec, "quantization", None)
    if quant is not None:
        out["quantization"] = quant.describe()
    return out


def attn_error(exc: BaseException, attn: str | None) -> BaseException:
    """A UserError at the stage's attn_implementation when the kernel is what failed, else
    ``exc`` (raise it outside any model field's scope: the field is the stage's own)."""
    text = first_line(exc)
    if not attn or not any(w in text.lower() for w in ("attn", "attention", "flash")):
        return exc
    return UserError(
        f"attn_implementation {attn!r} cannot be used: {text}",
        field="attn_implementation",
        hint="use sdpa or eager (or install the kernel's package on a CUDA machine)",
    )


def _name_causal_loss(model: Any, task: str) -> torch.nn.Module:
    """Name the causal-LM loss on models whose class name transformers 5 cannot map to one
    (GPT2LMHeadModel). The loss itself falls back to the right function either way, but the
    Trainer only counts tokens the causal way (``labels[..., 1:]``) when the name maps to it:
    unnamed, it divides by every label and reports 127/128 of the true mean loss of a packed
    128-token block (and warns "loss_type=None" on every run)."""
    if task in ("clm", "causal_lm") and getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return cast(torch.nn.Module, model)


def load_config(
    source: str,
    *,
    trust_remote_code: bool = False,
    shown: str | None = None,
    **kwargs: Any,
) -> PretrainedConfig:
    """A model's config (stage final dir, directory, hub id); UserError when there is none.

    ``shown`` is the name the recipe used (a stage name), when it differs from ``source``.
    Errors are about the field the caller scopes this to.
    """
    check_model_dir(source)  # every file of the directory, before any is loaded
    try:
        config = AutoConfig.from_pretrained(source, **_remote_kwargs(trust_remote_code), **kwargs)
        return cast(PretrainedConfig, config)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"cannot load a model from {shown or source!r}: {first_line(exc)}",
            field=HERE,
            hint="give an earlier stage, a directory with config.json, or a hub id",
        ) from exc


_CONFIG_KWARGS = ("num_labels", "id2label", "label2id", "problem_type")


def load_model(
    source: str,
    task: str,
    *,
    trust_remote_code: bool = False,
    model_field: str = HERE,
    loading_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a pretrained model for ``task`` via the Auto classes (stage final dir, directory, hub id).

    ``loading_info``, when given, is filled with transformers' report of the load
    (``missing_keys``: parameters the checkpoint did not hold and that were newly initialised,
    ``mismatched_keys``, ``unexpected_keys``). Errors are at ``model_field`` (relative to the
    stage), a kernel that fails at attn_implementation.
    """
    auto = _auto_class(task)
    remote = _remote_kwargs(trust_remote_code)
    # transformers 5 hands extra kwargs to the model constructor once a config is given, so
    # config attributes (a classifier's label map) must go into the config itself.
    config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_KWARGS}
    with field_scope(model_field):
        config = load_config(source, trust_remote_code=trust_remote_code, **config_kwargs)
    try:
        # Weights only from safetensors: a pickled pytorch_model.bin can run code when loaded.
        # fp32 always: transformers 5 otherwise keeps the stored dtype ("auto"), and a bf16
        # checkpoint would train in pure bf16 whatever train.precision says. Mixed precision
        # (bf16/fp16) autocasts the compute and keeps these fp32 weights as the master copy.
        # (``kwargs`` from loading_kwargs may name another dtype for frozen weights.)
        kwargs.setdefault("dtype", torch.float32)
        model, info = auto.from_pretrained(
            source, config=config, use_safetensors=True, output_loading_info=True,
            **remote, **kwargs,
        )  # fmt: skip
        if loading_info is not None:
            loading_info.update(info)
        return _name_causal_loss(model, task)
    except (ValueError, ImportError) as exc:
        error = attn_error(exc, kwargs.get("attn_implementation"))
        if error is not exc or isinstance(exc, ImportError):
            raise error from exc
        raise UserError(
            f"{source!r} is a {config.model_type} model, which cannot do {task}: {first_line(exc)}",
            field=model_field,
        ) from exc
    except OSError as exc:
        raise UserError(
            f"cannot load model weights from {source!r}: {first_line(exc)}",
            field=model_field,
            hint="mlsteps loads weights only from safetensors files; convert a pickled checkpoint "
            "with save_pretrained(..., safe_serialization=True)",
        ) from exc


def check_compatible(
    model: Any, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int | None
) -> None:
    """UserError when the tokenizer can emit ids the model has no embedding for, or when
    ``max_seq_len`` exceeds what the model's position embeddings cover."""
    embeddings = model.get_input_embeddings()
    n_rows = int(embeddings.weight.shape[0])
    n_tokens = len(tokenizer)
    if n_tokens > n_rows:
        raise UserError(
            f"tokenizer has {n_tokens} tokens but the model's embedding table has {n_rows} rows",
            field=HERE,
            hint="use the tokenizer the model was trained with (omit 'tokenizer' to take the one "
            "saved with 'from')",
        )
    limit = max_positions(model)
    if max_seq_len is not None and limit is not None and max_seq_len > limit:
        raise UserError(
            f"max_seq_len {max_seq_len} exceeds the model's {limit} positions",
            field=HERE,
            hint=f"set max_seq_len <= {limit}",
        )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def freeze_unseen_embeddings(model: torch.nn.Module, trainable_ids: Any) -> int:
    """Zero the gradient of every embedding row (input, and output when untied) whose token id
    is not in ``trainable_ids``; returns how many rows are frozen.

    Why: a token that never occurs in the training text still gets a gradient through the
    softmax ("never predict me"), and Adam turns that small, steady push into full-size steps.
    With tied embeddings all such rows drift into one shared direction (measured on the
    quickstart: mean cosine 0.0 -> 0.85 in 100 steps), and a later stage whose text needs them
    (a template's ':' or newline) then starts worse than a random model. Frozen rows get no Adam
    state and stay where they started.
    """
    lm: Any = model  # a PreTrainedModel; nn.Module's typing does not know its embedding getters
    weights = [lm.get_input_embeddings().weight]
    output = lm.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    rows = weights[0].shape[0]
    frozen = torch.ones(rows, dtype=torch.bool)
    frozen[torch.as_tensor(trainable_ids, dtype=torch.long)] = False
    for weight in weights:
        mask = frozen.to(weight.device)[:, None]
        weight.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0.0))
    return int(frozen.sum())

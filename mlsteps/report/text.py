"""Plain-language lines for the report: what a stage did (from its resolved config in recipe.yaml)
and its headline result (from its metrics). Pure functions over dicts; no heavy imports."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mlsteps.metrics import table

# Metrics stored on 0-1 (rouge-score, accuracy, F1, exact match; metrics.json keeps that scale)
# are shown x100 in stage ladders, next to sacrebleu's 0-100 BLEU/chrF/TER: one scale per table.
PERCENT_SCALED = frozenset(k for k in table.COLUMNS if table.percent_scaled(k))
LADDER_SCALE_NOTE = (
    "scale: every score is on 0-100 (BLEU, chrF, TER as sacrebleu reports them; ROUGE, "
    "accuracy, F1, exact match, token F1 and preference accuracy x100 here, stored on 0-1 in "
    "metrics.json)"
)


def ladder_value(column: str, value: Any) -> Any:
    """A ladder cell's value on the table's 0-100 scale (see PERCENT_SCALED)."""
    if column in PERCENT_SCALED and isinstance(value, int | float) and not isinstance(value, bool):
        return 100.0 * value
    return value


def _num(value: Any) -> str:
    if value is None:
        return "n/a"  # a metric that was not a finite number (its reason is in metrics.json)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def data_text(data: Any) -> str:
    """A DataSpec dict (or a list of them) as one short phrase: builtin:toy/translate (test),
    files, hub:id, aligned files; with the row selection in parentheses."""
    if isinstance(data, list):
        return " + ".join(data_text(d) for d in data) if data else "?"
    if not isinstance(data, dict):
        return str(data) if data else "?"
    details = []
    if data.get("builtin") or data.get("hub"):
        if data.get("builtin"):
            text = f"builtin:{data['builtin']}"
        else:
            text = f"hub:{data['hub']}" + (
                f"/{data['hub_config']}" if data.get("hub_config") else ""
            )
        details.append(data.get("split", "train"))
    elif data.get("aligned"):
        text = "aligned " + ", ".join(f"{col}={path}" for col, path in data["aligned"].items())
    else:
        files = [str(f) for f in data.get("files") or []]
        text = ", ".join(files[:3]) + (f" (+{len(files) - 3})" if len(files) > 3 else "")
        if data.get("txt_unit") not in (None, "line"):
            details.append(f"one row per {data['txt_unit']}")
    if data.get("shuffle_seed") is not None:
        details.append(f"shuffled with seed {data['shuffle_seed']}")
    if data.get("rows"):
        details.append(f"rows {data['rows']}")
    if data.get("max_samples"):
        details.append(f"first {data['max_samples']:,} rows")
    return text + (f" ({', '.join(details)})" if details else "")


def model_text(spec: dict[str, Any]) -> str:
    """'`pretrain`' for a 'from' reference, else the new architecture in words."""
    if spec.get("from"):
        return f"`{spec['from']}`"
    arch = spec.get("model") or {}
    if not arch:
        return "?"
    return (
        f"a new {arch.get('family')} ({arch.get('n_layers')} layers, width "
        f"{arch.get('hidden_size')}, {arch.get('n_heads')} heads; tokenizer "
        f"`{spec.get('tokenizer')}`)"
    )


def train_text(train: Any) -> str:
    """Optimisation settings in one phrase: steps, batch, lr, schedule."""
    if not isinstance(train, dict):
        return ""
    length = (
        f"{train['max_steps']:,} steps"
        if train.get("max_steps")
        else f"{train.get('epochs')} epochs"
    )
    batch = train.get("batch_size")
    if (train.get("grad_accum_steps") or 1) > 1:
        batch = f"{batch}x{train['grad_accum_steps']}"
    text = f"{length}, batch {batch}, lr {_num(train.get('lr'))} {train.get('schedule', '')}"
    if train.get("warmup_steps"):
        text += f" after {train['warmup_steps']} warmup steps"
    return text


def settings_line(key: str, value: Any) -> str:
    """One setting as text (data specs in words, the rest as is)."""
    if key in ("data", "validation"):
        return data_text(value)
    return str(value)


def _template(spec: dict[str, Any]) -> str:
    template = spec.get("template")
    return f" with template `{template!r}`" if template else ""


def describe_stage(spec: dict[str, Any], *, short: bool = False) -> str:
    """What a stage does, from its resolved config (``short``: a few words for the terminal)."""
    kind = spec.get("kind")
    data = data_text(spec.get("data")) if spec.get("data") else ""
    describe = _DESCRIBERS.get(str(kind))
    return describe(spec, data, short) if describe is not None else str(kind)


def _describe_tokenizer(spec: dict[str, Any], data: str, short: bool) -> str:
    if spec.get("from"):
        return f"wraps the tokenizer of `{spec['from']}`"
    text = f"{spec.get('algorithm')} tokenizer, vocab {_num(spec.get('vocab_size'))}"
    return text + (f" on {data}" if short else f" ({spec.get('target')} specials), on {data}")


def _describe_pretrain(spec: dict[str, Any], data: str, short: bool) -> str:
    objective = str(spec.get("objective", "clm")).upper()
    if short:
        if spec.get("from"):
            return f"{objective} of `{spec['from']}` on {data}"
        arch = spec.get("model") or {}
        return (
            f"{objective} of a new {arch.get('family')} "
            f"({arch.get('n_layers')}x{arch.get('hidden_size')}) on {data}"
        )
    val = (
        data_text(spec["validation"])
        if spec.get("validation")
        else f"{spec.get('validation_fraction')} held out"
    )
    return (
        f"{objective} pretraining of {model_text(spec)} on {data} "
        f"({spec.get('max_seq_len')}-token blocks; validation: {val}); "
        f"{train_text(spec.get('train'))}."
    )


def _describe_finetune(spec: dict[str, Any], data: str, short: bool) -> str:
    what = f"{spec.get('task')} fine-tuning ({spec.get('method', 'full')})"
    if short:
        start = f"from `{spec['from']}`" if spec.get("from") else "from scratch"
        return f"{what} {start} on {data}"
    text = f"{what} of {model_text(spec)} on {data}{_template(spec)}"
    if spec.get("task") == "causal_lm" and spec.get("template"):
        text += f", answer column `{spec.get('response_column')}`"
    if spec.get("method") == "lora":
        lora = spec.get("lora") or {}
        text += f", LoRA r={lora.get('r')} alpha={lora.get('alpha')}"
    return text + f"; {train_text(spec.get('train'))}."


def _describe_prompt(spec: dict[str, Any], data: str, short: bool) -> str:
    method = spec.get("method")
    if method == "few_shot":
        what = f"{spec.get('shots')}-shot prompt"
    elif method == "zero_shot":
        what = "zero-shot prompt"
    else:
        what = f"{method} ({spec.get('num_virtual_tokens')} virtual tokens)"
    if short:
        return f"{what} of `{spec.get('from')}`"
    text = f"{what} of `{spec.get('from')}`{_template(spec)}"
    if method == "few_shot":
        text += f"; demonstrations drawn from {data}"
    elif method != "zero_shot":
        text += f"; trained on {data}, {train_text(spec.get('train'))}"
    return text + "."


def _describe_eval(spec: dict[str, Any], data: str, short: bool) -> str:
    models = ", ".join(f"`{m}`" for m in spec.get("models") or [])
    metrics = ", ".join(spec.get("metrics") or [])
    tasks = ", ".join((spec.get("lm_eval") or {}).get("tasks") or [])
    if not spec.get("metrics"):  # lm_eval only: its tasks bring their own data
        data, metrics = "lm-eval tasks", tasks
    elif tasks:
        metrics += f"; lm-eval tasks {tasks}"
    if short:
        return f"{len(spec.get('models') or [])} models on {data}"
    return f"scores {models} on {data}: {metrics}."


def _describe_predict(spec: dict[str, Any], data: str, short: bool) -> str:
    return f"generates with `{spec.get('model')}` for {data}" + ("" if short else ".")


_DESCRIBERS: dict[str, Callable[[dict[str, Any], str, bool], str]] = {
    "tokenizer": _describe_tokenizer,
    "pretrain": _describe_pretrain,
    "finetune": _describe_finetune,
    "prompt": _describe_prompt,
    "eval": _describe_eval,
    "predict": _describe_predict,
}


def headline(kind: Any, m: Any) -> str:
    """The one result worth reading first, from a stage's metrics ('' when none)."""
    if not isinstance(m, dict) or not m:
        return ""
    if kind == "eval":
        return f"{len(m)} models scored (stage ladder)"
    parts: list[str] = []
    if kind == "tokenizer":
        parts.append(f"vocab {_num(m.get('vocab_size'))}")
        if "chars_per_token" in m:
            parts.append(f"{_num(m['chars_per_token'])} chars/token")
    if "initial_val_perplexity" in m and "val_perplexity" in m:
        before, after = m["initial_val_perplexity"], m["val_perplexity"]
        numbers = all(isinstance(v, int | float) for v in (before, after))
        factor = f" ({before / after:,.0f}x lower)" if numbers and after else ""
        parts.append(f"val perplexity {_num(before)} -> {_num(after)}{factor}")
    elif "val_perplexity" in m:
        parts.append(f"val perplexity {_num(m['val_perplexity'])}")
    for key, label in (("val_bleu", "val BLEU"), ("val_chrf", "chrF"), ("val_accuracy", "val acc")):
        if key in m:
            parts.append(f"{label} {_num(m[key])}")
    if kind in ("finetune", "prompt") and "val_loss" in m and len(parts) < 2:
        parts.append(f"val loss {_num(m['val_loss'])}")
    if m.get("train_truncated_examples"):
        share = m.get("train_truncated_share")
        parts.append(
            f"{_num(m['train_truncated_examples'])} training examples truncated"
            + (f" ({share:.1%})" if isinstance(share, float) else "")
        )
    if kind == "prompt" and m.get("num_demonstrations") and not m.get("trainable_params"):
        parts.append(
            f"{m['num_demonstrations']} demos, ~{_num(m.get('prompt_tokens_mean'))} tokens"
        )
    if kind == "predict" and "predictions" in m:
        parts.append(f"{_num(m['predictions'])} predictions")
    return ", ".join(parts)

"""How many positions a model can read: the one rule every stage, metric and check uses."""

from __future__ import annotations

from typing import Any

# Config fields that bound the position embeddings, by model family (first one set wins).
_POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len")


def config_max_positions(config: Any) -> int | None:
    """Longest input a model config's position embeddings cover; None when unbounded or unknown
    (T5's relative positions, rotary models without a limit)."""
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            model_type = str(getattr(config, "model_type", ""))
            if "roberta" in model_type or model_type == "camembert":
                # RoBERTa numbers positions from pad_token_id + 1: the rows up to there are
                # never read (engine.modeling sizes the table of the models it builds so).
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def max_positions(model: Any) -> int | None:
    """Longest input ``model`` takes, less the virtual tokens a peft soft prompt puts in front
    of every input."""
    config = getattr(model, "config", None)
    limit = config_max_positions(config) if config is not None else None
    if limit is None:
        return None
    virtual = getattr(getattr(model, "active_peft_config", None), "num_virtual_tokens", 0)
    return limit - int(virtual or 0)

"""Helpers shared by integration test modules (not collected: no test_ prefix)."""

from __future__ import annotations

from pathlib import Path

import torch


def adapter_logits(
    adapter: Path, seed: int, texts: list[str], without: tuple[str, ...] = ()
) -> torch.Tensor:
    """Logits of ``texts`` from the model saved at ``adapter``, loaded after seeding torch with
    ``seed``: equal logits under different seeds mean the saved files hold every module (any
    module they lack would be drawn from the seed). ``without``: tokenizer outputs the model's
    forward does not take (ModernBERT has no token_type_ids)."""
    from mlsteps.engine.inference import load_for_inference

    torch.manual_seed(seed)
    loaded = load_for_inference(str(adapter))
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    for name in without:
        batch.pop(name, None)
    with torch.no_grad():
        return loaded.model(**batch).logits

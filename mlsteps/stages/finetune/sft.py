"""Causal-LM fine-tuning (SFT) batches: prompt + response tokenised with only the response scored,
truncation that keeps the end of the prompt, packing whole examples, and the padding collator.
Prompt text and templates are ``data.sft_prompt``'s; chat rows reuse the packing and collator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch

from mlsteps.errors import HERE, UserError
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages.finetune.data import (
    IGNORE_INDEX,
    TRUNCATED,
    as_text,
    encode_rows,
    sft_prompt,
    special_prefix_ids,
    split_trailing_spaces,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def sft_truncate(
    prompt: list[int], response: list[int], max_len: int
) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_len tokens.

    The prompt loses tokens from its start (the end, next to the answer, matters most) but keeps
    at least half the budget when the response is long; the response then loses tokens from its
    end (including the EOS: a cut answer should not teach the model to stop there).
    """
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    keep_prompt = max(max_len - len(response), min(len(prompt), max_len // 2))
    prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
    return prompt, response[: max_len - len(prompt)]


def tokenize_sft(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, spec: FinetuneSpec
) -> datasets.Dataset:
    """Prompt tokens get label -100; response tokens + EOS are the only scored labels.

    Prompt and response are tokenised separately, exactly as the prompt is tokenised again at
    generation time, so the boundary the model sees in training is the one it sees in use.
    Trailing spaces of the prompt move to the response (see ``split_trailing_spaces``). A list
    of responses (several references) trains on the first.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError(
            "the tokenizer has no EOS token, so the model could never learn to stop",
            field=HERE,
            hint="use a tokenizer with an eos_token (a tokenizer stage with target clm has one)",
        )
    prefix = special_prefix_ids(tokenizer)

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        prompts = [sft_prompt(r, spec, index=i) for r, i in zip(rows, indices, strict=True)]
        responses = [
            as_text(
                r[spec.response_column], column=spec.response_column, row=i,
                first_of_list=True,
            )
            for r, i in zip(rows, indices, strict=True)
        ]  # fmt: skip
        split = [split_trailing_spaces(p) for p in prompts]
        prompts = [p for p, _ in split]
        responses = [ws + r for (_, ws), r in zip(split, responses, strict=True)]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        out[TRUNCATED] = []
        for p, r in zip(p_ids, r_ids, strict=True):
            out[TRUNCATED].append(len(prefix) + len(p) + len(r) + 1 > spec.max_seq_len)
            p, r = sft_truncate(prefix + list(p), list(r) + [eos_id], spec.max_seq_len)
            out["input_ids"].append(p + r)
            out["attention_mask"].append([1] * (len(p) + len(r)))
            out["labels"].append([IGNORE_INDEX] * len(p) + r)
        return out

    return encode_rows(ds, encode)


def pack_sft(ds: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Greedily pack whole examples (in order) into sequences of at most max_seq_len tokens.

    position_ids restart at 0 for every example. Without an attention mask, transformers (5.x)
    turns restarting position_ids into a block-diagonal causal mask, so packed examples do not
    see each other; the collator therefore drops attention_mask for packed batches.
    """
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_seq_len:
            for key in packed:
                packed[key].append(cur[key])
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        for key in packed:
            packed[key].append(cur[key])
    return datasets.Dataset.from_dict(packed)


@dataclass
class SftCollator:
    """Right-pads SFT batches. Padding is masked by position, never by token id: with
    pad == eos (gpt2) the EOS that ends each response stays a scored label."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        packed = "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for f in features:
            n_pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * n_pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * n_pad)
            if packed:
                # Padding forms its own trailing segment (positions from 0): no real token
                # attends to it (causal), and its labels are ignored.
                batch["position_ids"].append(list(f["position_ids"]) + list(range(n_pad)))
            else:
                batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * n_pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

"""Batched, length-sorted, order-keeping text generation for decoder-only and seq2seq models.

Inputs are sorted by token length so that a batch holds similar lengths (little padding, and the
longest batch runs first so memory problems show at once); outputs are written back in input
order. Decoder-only prompts are left-padded (the new tokens of every row start at the same
column) and the prompt is cut off the output; generation keeps the KV cache (``use_cache``).
Greedy decoding in fp32 gives the same text for batch size 1 and 32: padding is masked and the
position ids follow the attention mask.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from mlsteps.engine.chat_data import special_tokens_for
from mlsteps.errors import HERE, UserError
from mlsteps.positions import max_positions
from mlsteps.recipe.specs.model import GenerationSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _generation_config(model: Any, tokenizer: PreTrainedTokenizerBase, spec: GenerationSpec) -> Any:
    config = copy.deepcopy(model.generation_config)
    settings: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "num_beams": spec.num_beams,
        "do_sample": spec.do_sample,
        "pad_token_id": _pad_id(tokenizer),
        "use_cache": True,
        # The model's own defaults (e.g. a length limit or sampling settings stored with the
        # checkpoint) must not silently change what the recipe asked for.
        "max_length": None,
        "min_length": 0,
        "num_return_sequences": 1,
        # 1.0 / 0 are transformers' "off" values: always set, so a checkpoint's stored ones
        # cannot switch them on behind the recipe's back either.
        "repetition_penalty": spec.repetition_penalty,
        "no_repeat_ngram_size": spec.no_repeat_ngram_size,
    }
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if eos is not None:
        settings["eos_token_id"] = eos
    if spec.do_sample:
        settings.update(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or None)
    else:
        settings.update(temperature=None, top_p=None, top_k=None)
    config.update(**settings)
    return config


def _eos_ids(config: Any) -> set[int]:
    eos = config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, inputs: Sequence[str], *, decoder_only: bool
) -> list[list[int]]:
    """Token ids of each prompt exactly as generation feeds it, before any length cut.

    The tokenizer's special tokens are added, except to text a chat template rendered (it has
    its own: ``chat_data.ChatText``); a decoder-only prompt loses a trailing EOS (the
    model must continue it, not start after an end) and an empty one becomes [BOS or EOS].
    Conditional (response) perplexity conditions on these same ids.
    """
    encoded: list[list[int]] = [[] for _ in inputs]
    for special in (True, False):
        picked = [i for i, text in enumerate(inputs) if special_tokens_for(text) == special]
        if picked:
            ids = tokenizer([inputs[i] for i in picked], add_special_tokens=special)["input_ids"]
            for i, row in zip(picked, ids, strict=True):
                encoded[i] = list(row)
    if decoder_only:
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        for k, ids in enumerate(encoded):
            # The model continues the prompt: a trailing EOS added by the tokenizer would end it.
            if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id and ids[-1] != start:
                ids.pop()
            if not ids and start is not None:  # an empty prompt still needs one token to follow
                encoded[k] = [start]
    return encoded


def _encode(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[str],
    spec: GenerationSpec,
    decoder_only: bool,
) -> list[list[int]]:
    encoded = encode_prompts(tokenizer, inputs, decoder_only=decoder_only)
    limit = max_positions(model)
    if limit is None:
        return encoded
    if decoder_only:
        room = limit - spec.max_new_tokens
        if room < 1:
            raise UserError(
                f"max_new_tokens {spec.max_new_tokens} leaves no room for a prompt in the "
                f"model's {limit} positions",
                field=HERE,
                hint=f"set generation.max_new_tokens < {limit}",
            )
        # Keep the end of an over-long prompt: it is what the continuation follows.
        return [ids[-room:] if len(ids) > room else ids for ids in encoded]
    return [ids[:limit] for ids in encoded]


def _generate_batch(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: Any,
    decoder_only: bool,
    device: Any,
) -> list[str]:
    """Generate for one batch of encoded prompts; texts in the batch's order."""
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(config)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        if decoder_only:  # left padding: every prompt ends in the last column
            ids[row, width - n :] = torch.tensor(prompt)
            mask[row, width - n :] = 1
        else:
            ids[row, :n] = torch.tensor(prompt)
            mask[row, :n] = 1
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
    )
    new_tokens = out[:, width:] if decoder_only else out
    texts = []
    for row in range(len(prompts)):
        tokens = new_tokens[row].tolist()
        if not decoder_only and tokens and tokens[0] == config.decoder_start_token_id:
            tokens = tokens[1:]
        cut = next((k for k, t in enumerate(tokens) if t in eos_ids), len(tokens))
        # One flat id list decodes to one string (the list return is for batched input).
        text = cast(str, tokenizer.decode(tokens[:cut], skip_special_tokens=True))
        texts.append(text.strip())
    return texts


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: list[str],
    spec: GenerationSpec,
    *,
    seed: int,
) -> list[str]:
    """Generate one output per input, in input order (see the module docstring).

    Greedy when ``num_beams == 1`` and not ``do_sample``; beam search for ``num_beams > 1``;
    sampling (temperature/top-p/top-k) seeded with ``seed`` otherwise. Decoding stops at EOS or
    after ``max_new_tokens``; special tokens are dropped and the text stripped. Errors are about
    the generation settings: callers scope them (``field_scope("generation")``).
    """
    if not inputs:
        return []
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    config = _generation_config(model, tokenizer, spec)
    device = next(model.parameters()).device
    encoded = _encode(model, tokenizer, inputs, spec, decoder_only)
    order = sorted(range(len(inputs)), key=lambda i: len(encoded[i]), reverse=True)
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(inputs)
    cuda = [device] if device.type == "cuda" else []
    # Seed a private copy of the RNG state: sampling is reproducible, the caller's RNG untouched.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(order), spec.batch_size):
                batch = order[start : start + spec.batch_size]
                outputs_batch = _generate_batch(
                    model, tokenizer, [encoded[i] for i in batch], config, decoder_only, device
                )
                for i, text in zip(batch, outputs_batch, strict=True):
                    outputs[i] = text
        finally:
            model.train(was_training)
    return outputs

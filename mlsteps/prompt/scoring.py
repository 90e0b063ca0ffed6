"""Prompt + answer tokenisation, likelihood scoring and rank classification (torch side of prompting).

One encoding is used everywhere a prompted model sees text, so training, scoring and generation
agree token for token:

- causal LM: ``prompt`` is tokenised on its own (with the tokenizer's BOS if it adds one, never a
  trailing EOS), the answer separately without special tokens, and the two id lists are joined.
  This is exactly what generation sees: the prompt alone, then the model's continuation.
- seq2seq: the prompt is the encoder input and the answer the decoder labels (both with the
  tokenizer's special tokens, as in seq2seq fine-tuning).

Works with plain transformers models and with peft prompt-learning models (whose logits may carry
``num_virtual_tokens`` extra leading positions; scoring reads the trailing positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlsteps.engine.chat_data import special_tokens_for
from mlsteps.errors import HERE, UserError
from mlsteps.positions import max_positions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def is_seq2seq(model: Any) -> bool:
    """True for encoder-decoder models (also behind a peft wrapper)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return eos is not None and len(with_special) > len(without) and with_special[-1] == eos


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, seq2seq: bool = False
) -> list[int]:
    """Token ids of a prompt as the model reads it (see the module docstring); a prompt a chat
    template rendered gets no special tokens of the tokenizer (the template wrote its own)."""
    ids = list(tokenizer(prompt, add_special_tokens=special_tokens_for(prompt))["input_ids"])
    if seq2seq:
        return ids
    # A causal model must continue the prompt, not start after an end-of-sequence token.
    if ids and ids[-1] == tokenizer.eos_token_id and _appends_eos(tokenizer):
        ids = ids[:-1]
    if not ids:
        # Nothing to condition on (empty prompt, no BOS): the first answer token needs a context.
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if start is None:
            raise UserError(
                "the prompt is empty and the tokenizer has no BOS/EOS token to start from"
            )
        ids = [start]
    return ids


def encode_answer(
    tokenizer: PreTrainedTokenizerBase, answer: str, *, seq2seq: bool = False, add_eos: bool = False
) -> list[int]:
    """Token ids of an answer (the continuation after the prompt; decoder labels for seq2seq)."""
    if seq2seq:
        return list(tokenizer(text_target=answer, add_special_tokens=True)["input_ids"])
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def build_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, *, seq2seq: bool, max_seq_len: int
) -> dict[str, list[int]]:
    """One training example: loss only on the answer tokens (+EOS).

    Causal: when prompt + answer exceed ``max_seq_len`` the prompt loses tokens from its *start*
    (the end, next to the answer, matters most); the answer is cut only if it alone is too long.
    """
    if seq2seq:
        source = encode_prompt(tokenizer, prompt, seq2seq=True)[:max_seq_len]
        labels = encode_answer(tokenizer, answer, seq2seq=True)[:max_seq_len]
        return {"input_ids": source, "attention_mask": [1] * len(source), "labels": labels}
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = encode_answer(tokenizer, answer, add_eos=True)[: max_seq_len - 1]
    keep = max_seq_len - len(answer_ids)
    prompt_ids = prompt_ids[-keep:]
    ids = prompt_ids + answer_ids
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [-100] * len(prompt_ids) + answer_ids,
    }


@dataclass
class PromptCollator:
    """Right-pads input_ids/attention_mask with ``pad_id`` and labels with -100.

    Right padding keeps absolute positions of real tokens unchanged (gpt2 has no position_ids
    correction for left padding in training), and the virtual tokens peft prepends stay in front.
    """

    pad_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100)):
            if key not in features[0]:
                continue
            rows = [list(f[key]) for f in features]
            width = max(len(r) for r in rows)
            batch[key] = torch.tensor(
                [r + [fill] * (width - len(r)) for r in rows], dtype=torch.long
            )
        return batch


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id: pad, else EOS, else 0 (padded positions are masked everywhere)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def continuation_logprobs(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    max_seq_len: int | None = None,
) -> list[float]:
    """Σ log p(continuation tokens | prompt) for each (prompt, continuation) pair.

    ``length_normalize`` divides by the number of continuation tokens. Causal prompts longer than
    ``max_seq_len`` (default: the model's maximum positions) lose tokens from their start.
    """
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    seq2seq = is_seq2seq(model)
    # The model's limit is less a soft prompt's virtual tokens, which occupy positions in front
    # of every input (else: IndexError in the position embedding for prompts near the limit).
    limit = max_seq_len or max_positions(model)
    examples = _encode_pairs(tokenizer, prompts, continuations, seq2seq=seq2seq, limit=limit)
    collate = PromptCollator(pad_id_of(tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            if seq2seq:
                feats = [
                    {"input_ids": p, "attention_mask": [1] * len(p), "labels": c} for p, c in chunk
                ]
            else:
                feats = [
                    {
                        "input_ids": p + c,
                        "attention_mask": [1] * (len(p) + len(c)),
                        "labels": [-100] * len(p) + c,
                    }
                    for p, c in chunk
                ]
            batch = {k: v.to(device) for k, v in collate(feats).items()}
            totals = _summed_logprobs(model, batch, seq2seq=seq2seq, normalize=length_normalize)
            scores.extend(float(x) for x in totals.cpu())
    finally:
        model.train(was_training)
    return scores


def _encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    seq2seq: bool,
    limit: int | None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids) per pair; a causal prompt that would not fit ``limit``
    positions next to its continuation loses tokens from its start."""
    examples = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        p_ids = encode_prompt(tokenizer, prompt, seq2seq=seq2seq)
        c_ids = encode_answer(tokenizer, cont, seq2seq=seq2seq)
        if not c_ids:
            raise UserError(f"the answer {cont!r} tokenises to nothing")
        if limit and not seq2seq and len(p_ids) + len(c_ids) > limit:
            p_ids = p_ids[-max(1, limit - len(c_ids)) :]
        examples.append((p_ids, c_ids))
    return examples


def _summed_logprobs(
    model: Any, batch: dict[str, torch.Tensor], *, seq2seq: bool, normalize: bool
) -> torch.Tensor:
    """Per row of ``batch``: Σ log p of the labelled tokens (divided by their count when
    ``normalize``)."""
    labels = batch.pop("labels")
    if seq2seq:
        out = model(**batch, labels=labels)
        logits = out.logits[:, -labels.shape[1] :]
        targets = labels
    else:
        out = model(**batch)
        # peft prompt/p-tuning prepend virtual positions: keep the last len(input) ones.
        logits = out.logits[:, -labels.shape[1] :][:, :-1]
        targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    totals = picked.sum(-1)
    if normalize:
        totals = totals / mask.sum(-1).clamp(min=1)
    return totals


def check_verbalizer(
    tokenizer: PreTrainedTokenizerBase,
    verbalizer: Mapping[str, str],
    *,
    answer_prefix: str,
    seq2seq: bool,
) -> None:
    """UserError for a verbalizer word that tokenises to nothing or exactly like another word."""
    seen: dict[tuple[int, ...], str] = {}
    for label, word in verbalizer.items():
        ids = tuple(tokenizer(word, add_special_tokens=False)["input_ids"]) if word.strip() else ()
        if not ids:
            raise UserError(
                f"the verbalizer word {word!r} of label {label!r} tokenises to nothing",
                field=HERE,
                hint="use a word made of characters the tokenizer knows",
            )
        full = tuple(encode_answer(tokenizer, answer_prefix + word, seq2seq=seq2seq))
        if full in seen:
            raise UserError(
                f"verbalizer words {seen[full]!r} and {word!r} tokenise identically, so they cannot "
                "be told apart",
                field=HERE,
            )
        seen[full] = word


def label_logprobs(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    verbalizer: Mapping[str, str],
    *,
    answer_prefix: str = "",
    batch_size: int = 16,
    length_normalize: bool = False,
) -> list[list[float]]:
    """log p(answer_prefix + word | prompt) for every prompt (rows) and label (columns, in
    verbalizer order)."""
    labels = list(verbalizer)
    if not is_seq2seq(model):
        answers = [encode_answer(tokenizer, answer_prefix + verbalizer[k]) for k in labels]
        shared = answers[0][:-1]
        # Every answer is the same tokens (often just the prefix's space) then one of its own.
        if all(ids and ids[:-1] == shared for ids in answers):
            rows = _next_token_logprobs(
                model, tokenizer, prompts, shared, [a[-1] for a in answers], batch_size=batch_size
            )
            if not length_normalize:
                return rows
            return [[x / (len(shared) + 1) for x in row] for row in rows]  # every answer's length
    pairs_p = [p for p in prompts for _ in labels]
    pairs_c = [answer_prefix + verbalizer[label] for _ in prompts for label in labels]
    scores = continuation_logprobs(
        model, tokenizer, pairs_p, pairs_c, batch_size=batch_size, length_normalize=length_normalize
    )
    return [scores[i * len(labels) : (i + 1) * len(labels)] for i in range(len(prompts))]


def argmax_labels(labels: Sequence[str], rows: Sequence[Sequence[float]]) -> list[str]:
    # Ties go to the first label in verbalizer order (max returns the first maximum).
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in rows]


def rank_classify(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    verbalizer: Mapping[str, str],
    *,
    answer_prefix: str = "",
    batch_size: int = 16,
    length_normalize: bool = False,
) -> list[str]:
    """For each prompt, the label whose verbalizer word is most likely after it (rank classification).

    ``answer_prefix`` is ``Prompter.answer_prefix`` (usually " "), put before every word exactly as
    in demonstrations and soft-prompt training. Returns verbalizer keys (labels as text); ties go
    to the first label in verbalizer order.
    """
    rows = label_logprobs(
        model,
        tokenizer,
        prompts,
        verbalizer,
        answer_prefix=answer_prefix,
        batch_size=batch_size,
        length_normalize=length_normalize,
    )
    return argmax_labels(list(verbalizer), rows)


def _next_token_logprobs(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    shared: Sequence[int],
    token_ids: Sequence[int],
    *,
    batch_size: int,
) -> list[list[float]]:
    """log p(shared + token | prompt) for each prompt (rows) and answer (columns) of a causal
    model, when the answers are the same ``shared`` tokens and then one token each: one forward
    pass per prompt instead of one per (prompt, answer), since every answer's last token is
    scored at the same position. Prompts are cut from their start as in
    :func:`continuation_logprobs`; the numbers are the same up to float rounding (tested)."""
    limit = max_positions(model)
    keep = max(1, limit - len(shared) - 1) if limit else None
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    encoded = [(ids[-keep:] if keep else ids) + list(shared) for ids in encoded]
    collate = PromptCollator(pad_id_of(tokenizer))
    device = next(model.parameters()).device
    columns = torch.tensor(list(token_ids), device=device)
    targets = torch.tensor(list(shared), dtype=torch.long, device=device)
    span = torch.arange(len(shared) + 1, device=device)
    was_training = model.training
    model.eval()
    rows: list[list[float]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                feats = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in chunk]
                batch = {k: v.to(device) for k, v in collate(feats).items()}
                # peft prompt/p-tuning prepend virtual positions: keep the last len(input) ones.
                logits = model(**batch).logits[:, -batch["input_ids"].shape[1] :]
                # The positions that predict the shared tokens, then the answer's own token.
                first = torch.tensor([len(ids) - len(shared) - 1 for ids in chunk], device=device)
                where = (first[:, None] + span)[..., None].expand(-1, -1, logits.shape[-1])
                logp = torch.log_softmax(logits.gather(1, where).float(), dim=-1)
                prefix = logp[:, :-1].gather(-1, targets.expand(len(chunk), -1)[..., None])
                rows.extend((prefix.sum((1, 2))[:, None] + logp[:, -1][:, columns]).cpu().tolist())
    finally:
        model.train(was_training)
    return rows

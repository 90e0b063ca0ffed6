"""Conditional (response) perplexity: how likely each reference answer is given the model's prompt.

``response_perplexity = exp(Σ NLL of the reference tokens given the prompt / reference tokens)``,
token-weighted over the whole corpus (never a mean of per-row perplexities). It is the quantity
to compare across a ladder of models that answer prompts — an SFT model with a template, a
few-shot or soft-prompt model, a seq2seq model — because each is scored on the answer it was
trained or prompted to give, after the prompt it is given in generation.

- The prompt text comes from the caller (the eval stage builds it with the same code that feeds
  generation: the model's template, few-shot demonstrations, or the raw input column), and its
  token ids from :func:`mlsteps.engine.generation.encode_prompts`, so the conditioned prompt is
  the generated-from prompt, token for token. A soft prompt's virtual tokens are in front, as
  in generation (the peft model adds them).
- Causal LM: the prompt ids, then ``answer_prefix + reference`` tokenised on its own without
  special tokens, then EOS — exactly the response SFT and soft-prompt training score. Only the
  reference tokens and the EOS are scored; the prompt is context. A sequence longer than the
  window loses prompt tokens from its start; a reference that alone exceeds the window is
  scored with the sliding window of text perplexity (the prompt then keeps its last token).
- Seq2seq: the prompt is the encoder input (cut to the model's positions, as in generation) and
  the reference the decoder labels (``text_target`` tokenisation, EOS added when the tokenizer
  does not add it, as seq2seq fine-tuning does); the loss of ``model(input_ids, labels)``.
- Several references per row: the row's NLL, token, byte and word counts are the means over its
  references (each row weighs the same however many references it has).
- Bits per byte and word perplexity divide the same NLL (EOS included) by the UTF-8 bytes and
  the words of the reference text (not the answer prefix).

NLL sums are accumulated in float64; right padding is masked, so the batch size does not
change the result beyond float32 noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mlsteps.engine.generation import encode_prompts
from mlsteps.errors import HERE, UserError
from mlsteps.metrics.perplexity import (
    DEFAULT_MAX_WINDOW,
    PerplexityNumbers,
    _batches,
    _device,
    _logits,
    _pad,
    _windows,
    count_words,
    max_positions,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ResponsePerplexityResult(PerplexityNumbers):
    """Sums behind a response perplexity (counts may be fractional: means over references)."""

    nll_sum_nats: float
    scored_tokens: float
    utf8_bytes: float
    words: float
    convention: str

    def metrics(self) -> dict[str, Any]:
        """The eval stage's ``response_*`` metrics, convention included."""
        return {
            "response_perplexity": self.perplexity,
            "response_bits_per_byte": self.bits_per_byte,
            "response_word_perplexity": self.word_perplexity,
            "response_perplexity_tokens": self.scored_tokens,
            "response_perplexity_convention": self.convention,
        }


@dataclass
class _Item:
    """One unit of work: a window (causal) or an example (seq2seq), weighted 1/refs of its row."""

    input_ids: list[int]
    target_ids: list[int]
    scored: list[bool]
    weight: float


def _causal_items(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    references: list[list[str]],
    answer_prefix: str,
    window: int,
    stride: int,
) -> list[_Item]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    items: list[_Item] = []
    for prompt, refs in zip(prompt_ids, references, strict=True):
        answers = tokenizer([answer_prefix + r for r in refs], add_special_tokens=False)
        for answer in answers["input_ids"]:
            answer = list(answer) + eos
            # Keep as much of the prompt's end as fits one window next to the answer (>= 1 token).
            keep = max(1, window + 1 - len(answer))
            seq = prompt[-keep:] + answer
            scorable = [False] * min(keep, len(prompt)) + [True] * len(answer)
            for w in _windows(seq, scorable, window, stride):
                if any(w.scored):
                    items.append(_Item(w.input_ids, w.target_ids, w.scored, 1 / len(refs)))
    return items


def _seq2seq_items(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    references: list[list[str]],
) -> list[_Item]:
    limit = max_positions(model)
    eos = tokenizer.eos_token_id
    items: list[_Item] = []
    for row, (prompt, refs) in enumerate(zip(prompt_ids, references, strict=True)):
        source = prompt[:limit] if limit else prompt
        for labels in tokenizer(text_target=list(refs), add_special_tokens=True)["input_ids"]:
            labels = list(labels)
            if eos is not None and (not labels or labels[-1] != eos):
                labels.append(eos)  # as seq2seq fine-tuning trains it: the model learns to stop
            if limit is not None and len(labels) > limit:
                raise UserError(
                    f"reference of row {row} has {len(labels)} tokens, more than the model's "
                    f"{limit} decoder positions",
                    field=HERE,
                    hint="drop the longest rows (data.rows / max_samples) or the metric",
                )
            items.append(_Item(source, labels, [True] * len(labels), 1 / len(refs)))
    return items


@torch.no_grad()
def _score(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    items: list[_Item],
    batch_size: int,
    seq2seq: bool,
) -> float:
    """Σ weight * NLL of the scored targets, accumulated in float64."""
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_sum = 0.0
    for batch in _batches(items, batch_size, lambda it: len(it.input_ids) + len(it.target_ids)):
        ids, mask = _pad([it.input_ids for it in batch], pad_id, device)
        if seq2seq:
            labels, _ = _pad([it.target_ids for it in batch], -100, device)
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            logits = logits[:, -labels.shape[1] :].float()
        else:
            logits = _logits(model, ids, mask)
        for i, it in enumerate(batch):
            n = len(it.target_ids)
            nll = F.cross_entropy(
                logits[i, :n], torch.tensor(it.target_ids, device=device), reduction="none"
            )
            keep = torch.tensor(it.scored, device=device)
            nll_sum += it.weight * float(nll[keep].double().sum())
    return nll_sum


def response_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    answer_prefix: str = "",
    prompt_note: str = "the prompt given",
    window_tokens: int | None = None,
    stride_tokens: int | None = None,
    batch_size: int = 8,
    shard: Callable[[int], Sequence[int]] | None = None,
) -> ResponsePerplexityResult:
    """Perplexity of ``references`` given ``prompts`` (see the module docstring).

    ``prompts[i]`` is row i's prompt text exactly as generation gets it; ``references[i]`` its
    non-empty references. ``answer_prefix`` goes before each reference on the answer side (a
    prompted model's " ", see :mod:`mlsteps.prompt.prompter`). ``prompt_note`` says in the convention
    what the prompt was. ``shard(n_items)`` picks the windows/examples scored here (several
    processes add their sums); byte and word counts always cover all rows.
    """
    refs = _check_rows(prompts, references)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    prompt_ids = encode_prompts(tokenizer, list(prompts), decoder_only=not seq2seq)
    if seq2seq:
        items = _seq2seq_items(model, tokenizer, prompt_ids, refs)
        layout = (
            "seq2seq: the prompt is the encoder input (cut to the model's positions), the "
            "reference the decoder labels (text_target tokenisation, EOS appended if missing)"
        )
    else:
        items, layout = _causal_items_and_layout(
            model, tokenizer, prompt_ids, refs, answer_prefix, window_tokens, stride_tokens
        )
    if shard is not None:
        items = [items[i] for i in shard(len(items))]
    nll_sum = _score(model, tokenizer, items, batch_size, seq2seq)
    # Counted apart from the batches, correctly rounded: fractional weights (1/3 for three
    # references) must not make the count depend on the batch order.
    tokens = math.fsum(it.weight * sum(it.scored) for it in items)
    return ResponsePerplexityResult(
        nll_sum_nats=nll_sum,
        scored_tokens=tokens,
        utf8_bytes=sum(sum(len(x.encode("utf-8")) for x in r) / len(r) for r in refs),
        words=sum(sum(count_words(x) for x in r) / len(r) for r in refs),
        convention=_convention(prompt_note, layout, tokens, refs),
    )


def _check_rows(prompts: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """The references as lists, refused unless there is one row per prompt, none without one."""
    if len(prompts) != len(references):
        raise UserError(
            f"{len(prompts)} prompts but {len(references)} reference rows",
            field=HERE,
        )
    refs = [list(r) for r in references]
    if not refs or any(not r for r in refs):
        raise UserError("no references to score", field=HERE, hint="drop rows without one")
    return refs


def _causal_items_and_layout(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    refs: list[list[str]],
    answer_prefix: str,
    window_tokens: int | None,
    stride_tokens: int | None,
) -> tuple[list[_Item], str]:
    """A causal LM's items (window: the model's positions, at most DEFAULT_MAX_WINDOW) and the
    convention's words for how prompt and reference are laid out."""
    limit = max_positions(model)
    window = window_tokens or (min(limit, DEFAULT_MAX_WINDOW) if limit else None)
    if window is None:
        raise UserError(
            "the model config states no maximum length",
            field=HERE,
            hint="set perplexity.window",
        )
    stride = min(stride_tokens or window, window)
    items = _causal_items(tokenizer, prompt_ids, refs, answer_prefix, window, stride)
    eos = (
        "then EOS (scored, as SFT trains it)"
        if tokenizer.eos_token_id is not None
        else ("no EOS (the tokenizer has none)")
    )
    layout = (
        f"causal LM: prompt tokens as in generation, then {answer_prefix!r} + reference "
        f"tokenised separately without special tokens, {eos}; only reference tokens scored; "
        f"window={window} (a prompt that does not fit loses tokens from its start; a longer "
        f"reference is scored with stride={stride})"
    )
    return items, layout


def _convention(prompt_note: str, layout: str, tokens: float, refs: list[list[str]]) -> str:
    n_refs = sum(len(r) for r in refs)
    several = (
        f"; several references: mean over a row's references ({n_refs} references, "
        f"{len(refs)} rows)"
        if n_refs > len(refs)
        else ""
    )
    return (
        f"response perplexity of the reference given {prompt_note}; {layout}; "
        f"ppl=exp(sum NLL/{tokens:g} tokens) over the corpus; bits_per_byte over the reference's "
        f"UTF-8 bytes, word_perplexity over its whitespace words (+1 per CJK char){several}"
    )


def describe_prompt(prompter: Any, input_column: str) -> str:
    """What a model's response perplexity is conditioned on, in words (for the convention)."""
    if prompter is None:
        return f"the input column '{input_column}' as is (the model has no prompt template)"
    template = f"the template {prompter.template!r}"
    method = prompter.method
    if method == "finetune":
        kind = "seq2seq source_prefix" if prompter.model_kind == "seq2seq" else "SFT"
        return f"the model's {kind} template {prompter.template!r}"
    chat = " as chat turns through the model's chat template" if prompter.chat else ""
    if method == "few_shot":
        how = "drawn per row" if prompter.per_example else "fixed"
        return f"{prompter.shots} demonstrations ({how}) + {template}{chat}"
    if prompter.num_virtual_tokens:
        return f"{prompter.num_virtual_tokens} soft-prompt virtual tokens ({method}) + {template}"
    return f"{template} ({method}){chat}"


def sharded_response_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    references: Sequence[Sequence[str]],
    **options: Any,
) -> ResponsePerplexityResult:
    """:func:`response_perplexity`; in a multi-process run each rank scores a disjoint share of
    the windows/examples and the sums are added, so every one is scored exactly once."""
    from mlsteps.distributed import all_gather_object, is_distributed, shard_indices

    if not is_distributed():
        return response_perplexity(model, tokenizer, prompts, references, **options)
    mine = response_perplexity(
        model, tokenizer, prompts, references, shard=shard_indices, **options
    )
    sums = all_gather_object((mine.nll_sum_nats, mine.scored_tokens))
    total = sum(tokens for _, tokens in sums)
    return replace(
        mine,
        nll_sum_nats=sum(nll for nll, _ in sums),
        scored_tokens=total,
        convention=mine.convention.replace(f"/{mine.scored_tokens:g} tokens", f"/{total:g} tokens"),
    )

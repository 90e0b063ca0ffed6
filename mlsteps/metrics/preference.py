"""``preference_accuracy``: how often a model prefers the chosen answer of a held-out pair.

For each pair the model scores log p(answer | prompt) of ``chosen`` and of ``rejected``: the sum
of the answer tokens' log-probabilities, computed in float64. Accuracy is the share of pairs
whose chosen sum is strictly higher (a tie counts as a miss); the length-normalised variant
compares the mean per answer token instead (it does not favour short answers, e.g. a truncated
rejected one).

Tokenisation follows TRL's preference trainers, so the metric sees the sequences training saw:
plain text is ``prompt + answer + EOS``; a conversation is the chat template of ``prompt +
answer turns``. The answer starts where the tokenised prompt and the tokenised ``prompt +
answer`` first differ (tokens can merge across the boundary, e.g. a prompt ending in a space).
Sequences longer than the model's positions keep their end (the answer), dropping prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlsteps.engine import chat_data
from mlsteps.errors import HERE, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONVENTION = (
    "share of pairs with log p(chosen|prompt) > log p(rejected|prompt) (sums over answer tokens, "
    "float64, ties count as misses); _normalized compares per-token means; plain text scored as "
    "prompt+answer+EOS, conversations through the chat template; {n} pairs"
)


@dataclass
class PreferenceResult:
    """Accuracy (sum and per-token mean), the pair count and the convention string."""

    accuracy: float
    accuracy_normalized: float
    pairs: int
    convention: str


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, answer: Any
) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt+answer ids) the way TRL builds them."""
    if chat_data.is_conversation(prompt):
        turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        p = chat_data.template_ids(tokenizer, prompt, generation_prompt=True)
        full = chat_data.template_ids(tokenizer, prompt + turns, generation_prompt=False)
        return p, full
    eos = tokenizer.eos_token or ""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + answer + eos, add_special_tokens=False)["input_ids"]
    return list(p), list(full)


def _answer_logprobs(
    model: Any, sequences: list[tuple[list[int], int]], pad_id: int, limit: int | None
) -> list[tuple[float, int]]:
    """(sum of answer-token log-probs, answer tokens) per (ids, answer start) in one batch."""
    device = next(model.parameters()).device
    cut = []
    for ids, start in sequences:
        if limit is not None and len(ids) > limit:
            drop = len(ids) - limit
            ids, start = ids[drop:], max(1, start - drop)
        cut.append((ids, max(1, start)))
    width = max(len(ids) for ids, _ in cut)
    input_ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.long)
    for i, (ids, _) in enumerate(cut):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    # A soft-prompt (peft prompt-learning) model puts its virtual tokens first: keep the real ones.
    logits = logits[:, -width:]
    logp = torch.log_softmax(logits.double(), dim=-1)
    out = []
    for i, (ids, start) in enumerate(cut):
        targets = torch.tensor(ids[start:], device=logp.device)
        rows = logp[i, start - 1 : len(ids) - 1]
        picked = rows.gather(1, targets[:, None]).squeeze(1)
        out.append((float(picked.sum()), len(ids) - start))
    return out


def pair_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    chosen: list[Any],
    rejected: list[Any],
    *,
    batch_size: int = 16,
    max_positions: int | None = None,
) -> list[tuple[float, int, float, int]]:
    """Per pair: (chosen log-prob sum, chosen tokens, rejected log-prob sum, rejected tokens)."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise UserError(
            f"preference_accuracy got {len(prompts)} prompts, {len(chosen)} chosen and "
            f"{len(rejected)} rejected answers",
            field=HERE,
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items: list[tuple[list[int], int]] = []
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        p, full_good = _encode(tokenizer, prompt, good)
        _, full_bad = _encode(tokenizer, prompt, bad)
        start = min(chat_data.common_prefix(p, full_good), chat_data.common_prefix(p, full_bad))
        if start >= len(full_good) or start >= len(full_bad):
            raise UserError(
                "a preference pair has an empty answer after tokenisation",
                field=HERE,
                hint="every chosen and rejected answer must be non-empty text",
            )
        items += [(full_good, start), (full_bad, start)]
    scores: list[tuple[float, int]] = []
    for i in range(0, len(items), 2 * batch_size):
        scores += _answer_logprobs(model, items[i : i + 2 * batch_size], pad_id, max_positions)
    return [(*scores[k], *scores[k + 1]) for k in range(0, len(scores), 2)]


def pair_hits(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    chosen: list[Any],
    rejected: list[Any],
    *,
    batch_size: int = 16,
    max_positions: int | None = None,
) -> list[tuple[bool, bool]]:
    """Per pair: (chosen sum beats rejected, chosen per-token mean beats rejected)."""
    scores = pair_scores(
        model, tokenizer, prompts, chosen, rejected,
        batch_size=batch_size, max_positions=max_positions,
    )  # fmt: skip
    return [(gs > bs, gs / gn > bs / bn) for gs, gn, bs, bn in scores]


def summarize(hits: list[tuple[bool, bool]]) -> PreferenceResult:
    """Accuracy over per-pair hits (see ``pair_hits``)."""
    if not hits:
        raise UserError("preference_accuracy needs at least one pair", field=HERE)
    n = len(hits)
    return PreferenceResult(
        sum(h[0] for h in hits) / n,
        sum(h[1] for h in hits) / n,
        n,
        CONVENTION.format(n=n),
    )


def preference_accuracy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    chosen: list[Any],
    rejected: list[Any],
    *,
    batch_size: int = 16,
    max_positions: int | None = None,
) -> PreferenceResult:
    """Preference accuracy of ``model`` on the pairs; UserError for empty or mismatched input."""
    hits = pair_hits(
        model, tokenizer, prompts, chosen, rejected,
        batch_size=batch_size, max_positions=max_positions,
    )  # fmt: skip
    return summarize(hits)


def pairs_from_rows(
    rows: Any, prompt_column: str, chosen_column: str, rejected_column: str
) -> list[list[Any]]:
    """[prompts, chosen, rejected] of an eval data set; whole conversations without a prompt
    column are split at their last shared turn (the trl-lib/ultrafeedback_binarized layout)."""
    from mlsteps.engine.data import require_columns

    answers = [chosen_column, rejected_column]
    require_columns(rows, answers)
    if prompt_column in rows.column_names or not (
        rows.num_rows and chat_data.is_conversation(rows[0][chosen_column])
    ):
        require_columns(rows, [prompt_column])
        return [list(rows[c]) for c in [prompt_column, *answers]]
    split = [chat_data.split_pair(c, r) for c, r in zip(*(rows[c] for c in answers), strict=True)]
    return [[s[k] for s in split] for k in range(3)]


def ladder_scores(loaded: Any, pairs: list[list[Any]], batch_size: int) -> dict[str, Any]:
    """preference_accuracy (and its length-normalised variant) of a loaded causal LM for the
    eval stage's ladder; under torchrun each rank scores a share of the pairs."""
    from mlsteps.distributed import map_sharded
    from mlsteps.positions import config_max_positions

    def score(idx: list[int]) -> list[tuple[bool, bool]]:
        return pair_hits(
            loaded.model, loaded.tokenizer, *[[col[i] for i in idx] for col in pairs],
            batch_size=batch_size, max_positions=config_max_positions(loaded.model.config),
        )  # fmt: skip

    res = summarize(map_sharded(score, list(range(len(pairs[0])))))
    return {
        "preference_accuracy": res.accuracy,
        "preference_accuracy_normalized": res.accuracy_normalized,
        "preference_pairs": res.pairs,
        "preference_accuracy_convention": res.convention,
    }

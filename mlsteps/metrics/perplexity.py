"""Perplexity of causal and masked language models (design.md section 4).

Causal LM. Perplexity is ``exp(sum of token NLL / number of scored tokens)`` over the whole
corpus, never a mean of per-window or per-document perplexities. A token sequence is cut into
windows of at most ``window_tokens`` input tokens: the first window scores every token it can
predict, each following one advances ``stride_tokens`` and scores only the new tokens; its input
is the ``window_tokens`` tokens ending just before its last scored token, so the rest (the
overlap) is context. Every token after the first position is scored exactly once; with
``stride == window`` a window's first prediction still sees the last token of the previous
window, and a short last window gets extra context. Modes:

- ``document``: each row is its own sequence, prefixed with the tokenizer's BOS token (else its
  EOS token) so the row's first token is scored too; without either, the first token is context.
- ``stream``: rows are joined with EOS into one sequence (prefixed as above); the EOS separators
  are context, not scored, so both modes score exactly the rows' tokens.

Bits per byte ``sum NLL / (ln 2 * UTF-8 bytes of the scored rows)`` and word perplexity
``exp(sum NLL / words)`` (whitespace words, each CJK character counted as one word) do not depend
on the tokenizer. Windows are batched with right padding; padded positions are never scored.

Masked LM: two different metrics.

- ``masked_perplexity``: a fixed random ``mask_fraction`` of each chunk's tokens (at least one;
  drawn from ``mask_seed`` and the chunk's index, so batching does not change it) is replaced by
  the mask token all at once; ``exp(sum NLL of the masked originals / number masked)``.
- ``pseudo_perplexity`` (Salazar et al. 2020): every token is masked in turn, one copy of the
  chunk per token (copies batched); ``exp(-sum log p(token | rest) / number of tokens)``.

Long rows are cut into consecutive chunks that fit the model with its special tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F

from mlsteps.errors import HERE, UserError

# The one position rule; config_max_positions is re-exported for the eval stage.
from mlsteps.positions import config_max_positions, max_positions  # noqa: F401

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CJK_CHAR_RE = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"
)


# Default window cap: long-context models (e.g. 131072 positions) would otherwise get windows
# whose logits (window x vocab floats per row) do not fit in memory.
DEFAULT_MAX_WINDOW = 2048


class PerplexityNumbers:
    """Perplexity, bits per byte and word perplexity derived from the sums of a result class
    (text perplexity here, response perplexity in response_perplexity.py)."""

    nll_sum_nats: float
    scored_tokens: float
    utf8_bytes: float
    words: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum_nats / self.scored_tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum_nats / (math.log(2) * self.utf8_bytes) if self.utf8_bytes else math.nan

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum_nats / self.words) if self.words else math.nan


@dataclass(frozen=True)
class PerplexityResult(PerplexityNumbers):
    """Sums behind a perplexity; the derived numbers are properties."""

    nll_sum_nats: float
    scored_tokens: int
    utf8_bytes: int
    words: int
    convention: str


def count_words(text: str) -> int:
    """Whitespace-separated words, with every CJK character counted as one word."""
    cjk = len(_CJK_CHAR_RE.findall(text))
    return cjk + len(_CJK_CHAR_RE.sub(" ", text).split())


def _prefix_token(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, str]:
    for attr in ("bos_token", "eos_token"):
        token_id = getattr(tokenizer, f"{attr}_id", None)
        if token_id is not None:
            return (
                token_id,
                f"first token conditioned on {attr.split('_')[0].upper()} {getattr(tokenizer, attr)!r}",
            )
    return None, "no BOS/EOS token: the first token of each sequence is context only"


@dataclass
class _Window:
    input_ids: list[int]
    target_ids: list[int]
    scored: list[bool]


def _windows(seq: list[int], scorable: list[bool], window: int, stride: int) -> Iterator[_Window]:
    """Windows over one sequence: targets [t0, t1) predicted from ids[t1-1-window : t1-1]."""
    t0, t1 = 1, min(1 + window, len(seq))
    while t0 < len(seq):
        start = max(0, t1 - 1 - window)
        targets = range(start + 1, t1)
        yield _Window(
            input_ids=seq[start : t1 - 1],
            target_ids=seq[start + 1 : t1],
            scored=[t >= t0 and scorable[t] for t in targets],
        )
        t0, t1 = t1, min(t1 + stride, len(seq))


def _batches(items: list[Any], batch_size: int, length: Any) -> Iterator[list[Any]]:
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory
    # error shows up in the first batch rather than after most of the work.
    ordered = sorted(items, key=length, reverse=True)
    for i in range(0, len(ordered), batch_size):
        yield ordered[i : i + batch_size]


def _device(model: Any) -> torch.device:
    return cast(torch.device, next(model.parameters()).device)


def _pad(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    # Soft-prompt (peft prompt tuning) models return logits for the virtual tokens too.
    return cast(torch.Tensor, logits[:, -ids.shape[1] :].float())


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def causal_lm_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window_tokens: int | None = None,
    stride_tokens: int | None = None,
    mode: Literal["document", "stream"] = "document",
    batch_size: int = 8,
    shard: Callable[[int], Sequence[int]] | None = None,
) -> PerplexityResult:
    """Corpus perplexity of a causal LM over ``texts`` (see the module docstring).

    Blank rows are skipped. ``window_tokens`` defaults to the model's maximum positions (at most
    ``DEFAULT_MAX_WINDOW``) and ``stride_tokens`` to the window.

    ``shard(n_windows)`` picks which of the windows to score here (several processes: each
    scores its share, and their NLL sums and token counts add up to the whole). Byte and word
    counts always cover all of ``texts``.
    """
    window, stride = _window_and_stride(model, window_tokens, stride_tokens)
    docs = [t for t in texts if t.strip()]
    prefix_id, prefix_note = _prefix_token(tokenizer)
    prefix = [prefix_id] if prefix_id is not None else []
    sep_id = tokenizer.eos_token_id if mode == "stream" else None
    sequences = _sequences(_tokenize(tokenizer, docs), prefix, mode, sep_id)
    windows = [w for seq, ok in sequences for w in _windows(seq, ok, window, stride)]
    windows = [w for w in windows if any(w.scored)]
    if not windows:
        raise UserError("no tokens to score", field=HERE, hint="the text column is empty or blank")
    if shard is not None:
        windows = [windows[i] for i in shard(len(windows))]
    nll_sum, scored = _score_windows(model, tokenizer, windows, batch_size)
    return PerplexityResult(
        nll_sum_nats=nll_sum,
        scored_tokens=scored,
        utf8_bytes=sum(len(d.encode("utf-8")) for d in docs),
        words=sum(count_words(d) for d in docs),
        convention=_causal_convention(window, stride, mode, prefix_note, scored),
    )


def _window_and_stride(
    model: Any, window_tokens: int | None, stride_tokens: int | None
) -> tuple[int, int]:
    """The window (default: the model's positions, at most DEFAULT_MAX_WINDOW) and the stride
    (default: the window), checked against the model and each other."""
    limit = max_positions(model)
    window = window_tokens or (min(limit, DEFAULT_MAX_WINDOW) if limit else None)
    if window is None:
        raise UserError(
            "the model config states no maximum length", field=HERE, hint="set perplexity.window"
        )
    if limit is not None and window > limit:
        raise UserError(
            f"window {window} exceeds the model's {limit} positions",
            field=HERE,
            hint=f"set perplexity.window <= {limit}",
        )
    stride = stride_tokens or window
    if stride > window:
        raise UserError(
            f"stride {stride} exceeds window {window}", field=HERE, hint="use stride <= window"
        )
    return window, stride


def _sequences(
    token_lists: list[list[int]], prefix: list[int], mode: str, sep_id: int | None
) -> list[tuple[list[int], list[bool]]]:
    """The token sequences windows are cut from, each with which tokens are scored: one per
    non-empty row (document mode), or all rows joined with EOS, which is context (stream)."""
    sequences: list[tuple[list[int], list[bool]]] = []
    if mode == "document":
        for ids in token_lists:
            if ids:
                seq = prefix + ids
                sequences.append((seq, [True] * len(seq)))
        return sequences
    seq, scorable = list(prefix), [True] * len(prefix)
    for ids in token_lists:
        if len(seq) > len(prefix) and sep_id is not None:
            seq.append(sep_id)
            scorable.append(False)  # the separator is context, not text
        seq += ids
        scorable += [True] * len(ids)
    sequences.append((seq, scorable))
    return sequences


def _score_windows(
    model: Any, tokenizer: PreTrainedTokenizerBase, windows: list[_Window], batch_size: int
) -> tuple[float, int]:
    """The NLL sum (nats, accumulated in float64) and the count of the windows' scored tokens."""
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_sum = 0.0
    scored = 0
    for batch in _batches(windows, batch_size, lambda w: len(w.input_ids)):
        batch_ids, batch_mask = _pad([w.input_ids for w in batch], pad_id, device)
        logits = _logits(model, batch_ids, batch_mask)
        for i, w in enumerate(batch):
            n = len(w.input_ids)
            nll = F.cross_entropy(
                logits[i, :n], torch.tensor(w.target_ids, device=device), reduction="none"
            )
            keep = torch.tensor(w.scored, device=device)
            nll_sum += float(nll[keep].double().sum())
            scored += int(keep.sum())
    return nll_sum, scored


def _causal_convention(window: int, stride: int, mode: str, prefix_note: str, scored: int) -> str:
    doc_note = (
        "document (each row scored from its start)"
        if mode == "document"
        else "stream (rows joined with EOS; separators are context, not scored)"
    )
    return (
        f"causal LM; window={window} tokens, stride={stride} (overlap is context only); "
        f"mode={doc_note}; {prefix_note}; ppl=exp(sum NLL/{scored} tokens); bits_per_byte over "
        f"UTF-8 bytes; word_perplexity over whitespace words (+1 per CJK char); blank rows skipped"
    )


def _special_wrap(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer puts before/after a single sequence (e.g. [CLS] ... [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    return [], []


def _mlm_chunks(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window_tokens: int | None
) -> tuple[list[list[int]], list[range], int]:
    """Chunks with special tokens, and for each the positions of its real tokens."""
    if tokenizer.mask_token_id is None:
        raise UserError(
            "the tokenizer has no mask token",
            field=HERE,
            hint="masked-LM metrics need an MLM tokenizer",
        )
    limit = max_positions(model)
    window = window_tokens or limit
    if window is None:
        raise UserError(
            "the model config states no maximum length", field=HERE, hint="set perplexity.window"
        )
    head, tail = _special_wrap(tokenizer)
    body = window - len(head) - len(tail)
    if body < 1 or (limit is not None and window > limit):
        raise UserError(
            f"window {window} does not fit the model",
            field=HERE,
            hint=f"set perplexity.window <= {limit}",
        )
    chunks, positions = [], []
    for ids in _tokenize(tokenizer, [t for t in texts if t.strip()]):
        for i in range(0, len(ids), body):
            piece = ids[i : i + body]
            chunks.append(head + piece + tail)
            positions.append(range(len(head), len(head) + len(piece)))
    if not chunks:
        raise UserError("no tokens to score", field=HERE, hint="the text column is empty or blank")
    return chunks, positions, window


def _score_masked(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[tuple[list[int], list[int], list[int]]],
    batch_size: int,
) -> tuple[float, int]:
    """rows: (input ids, masked positions, original ids there) -> (sum NLL, count)."""
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_sum, count = 0.0, 0
    for batch in _batches(rows, batch_size, lambda r: len(r[0])):
        ids, mask = _pad([r[0] for r in batch], pad_id, device)
        logits = _logits(model, ids, mask)
        for i, (_, where_masked, originals) in enumerate(batch):
            picked = logits[i, torch.tensor(where_masked, device=device)]
            nll = F.cross_entropy(picked, torch.tensor(originals, device=device), reduction="sum")
            nll_sum += float(nll.double())
            count += len(originals)
    return nll_sum, count


@torch.no_grad()
def masked_lm_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    mask_seed: int = 0,
    mask_fraction: float = 0.15,
    window_tokens: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Masked-token perplexity with a fixed mask (see the module docstring)."""
    chunks, positions, window = _mlm_chunks(model, tokenizer, texts, window_tokens)
    rows = []
    for index, (chunk, pos) in enumerate(zip(chunks, positions, strict=True)):
        # Seeded per chunk: the mask of a chunk never depends on batching or on other rows.
        generator = torch.Generator().manual_seed((mask_seed * 1_000_003 + index) % 2**63)
        k = max(1, round(mask_fraction * len(pos)))
        picked = sorted(pos[int(j)] for j in torch.randperm(len(pos), generator=generator)[:k])
        masked = list(chunk)
        for p in picked:
            masked[p] = tokenizer.mask_token_id
        rows.append((masked, picked, [chunk[p] for p in picked]))
    nll_sum, count = _score_masked(model, tokenizer, rows, batch_size)
    convention = (
        f"masked LM; {mask_fraction:g} of each chunk's tokens (min 1) replaced by the mask token "
        f"at once, mask_seed={mask_seed}; chunks of {window} tokens incl. special tokens; "
        f"ppl=exp(sum NLL/{count} masked tokens)"
    )
    return PerplexityResult(nll_sum, count, 0, 0, convention)


@torch.no_grad()
def pseudo_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window_tokens: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Pseudo-perplexity (Salazar et al. 2020): each token masked in turn, copies batched."""
    chunks, positions, window = _mlm_chunks(model, tokenizer, texts, window_tokens)
    rows = []
    for chunk, pos in zip(chunks, positions, strict=True):
        for p in pos:
            masked = list(chunk)
            masked[p] = tokenizer.mask_token_id
            rows.append((masked, [p], [chunk[p]]))
    nll_sum, count = _score_masked(model, tokenizer, rows, batch_size)
    convention = (
        f"pseudo-perplexity (Salazar et al. 2020): each token masked alone; chunks of {window} "
        f"tokens incl. special tokens; pppl=exp(-sum log p/{count} tokens)"
    )
    return PerplexityResult(nll_sum, count, 0, 0, convention)

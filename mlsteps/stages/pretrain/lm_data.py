"""Language-model data: tokenise documents, pack them into blocks, mask for MLM, score exactly.

- CLM blocks: documents joined with EOS into one stream, cut into ``max_seq_len`` blocks (no
  padding inside a block; only a kept remainder is shorter).
- MLM blocks: documents joined with SEP, cut into ``max_seq_len - 2`` pieces, each wrapped as
  ``CLS ... SEP`` (RoBERTa "full sentences" packing).
- Masking (80% mask token / 10% random token / 10% unchanged) draws from a generator seeded by
  ``(seed, batch_serial)``: a batch's masks depend only on its position in training, which is
  what lets a resumed run reproduce an uninterrupted one (``train`` restores ``batch_serial``).
- ``LossEvaluator`` scores a fixed set of batches token-weighted: exp(ΣNLL / Σscored tokens).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch

from mlsteps.stages.pretrain.packing import PackedBlocks, pack_token_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_documents(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    *,
    end_id: int,
    cache_dir: Any = None,
) -> datasets.Dataset:
    """``input_ids`` per document (no special tokens), each followed by ``end_id``.

    Batched ``datasets.map``; results are cached by fingerprint when ``ds`` lives in cache files.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [end_id] for row, t in zip(ids, texts, strict=True) if t]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


def token_counts(blocks: Any) -> np.ndarray:
    """How often each token id occurs in ``blocks`` (index = id), streaming: ``PackedBlocks``
    counted them while packing; a ``datasets.Dataset`` of ``input_ids`` is read a chunk at a
    time, never flattened whole."""
    if isinstance(blocks, PackedBlocks):
        return blocks.token_counts()
    counts = np.zeros(0, dtype=np.int64)
    if blocks._indices is not None:  # a selection: read the rows it points at
        for batch in blocks.iter(batch_size=1 << 12):
            ids = np.fromiter(chain.from_iterable(batch["input_ids"]), dtype=np.int64)
            counts = _add(counts, np.bincount(ids[ids >= 0]))
        return counts
    for batch in blocks.data.table.select(["input_ids"]).to_batches(max_chunksize=1 << 16):
        ids = batch.column(0).flatten().to_numpy(zero_copy_only=False)
        counts = _add(counts, np.bincount(ids[ids >= 0]))
    return counts


def _add(total: np.ndarray, more: np.ndarray) -> np.ndarray:
    if len(more) > len(total):
        more = more.astype(np.int64)
        more[: len(total)] += total
        return more
    total[: len(more)] += more
    return total


def seen_token_ids(blocks: Any, vocab_size: int) -> np.ndarray:
    """The distinct token ids below ``vocab_size`` that occur in ``blocks`` (sorted)."""
    counts = token_counts(blocks)[:vocab_size]
    return np.nonzero(counts)[0]


def unigram_perplexity(
    train_blocks: Any,
    val_blocks: Any,
    vocab_size: int,
    skip_ids: Sequence[int] = (),
) -> float:
    """Perplexity on the validation tokens of the training text's token frequencies (add-one
    smoothed), ``skip_ids`` (special tokens) left out on both sides: the number a language model
    that ignores all context reaches. A pretrained model near it has learned only how frequent
    each token is; its hidden states carry almost nothing of the input (see docs/quickstart.md,
    "Why the MLM start lost"). Computed from token counts, so neither set is held in memory."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    train = token_counts(train_blocks)[:vocab_size]
    counts[: len(train)] = train
    val_counts = np.zeros(vocab_size, dtype=np.int64)
    val = token_counts(val_blocks)[:vocab_size]
    val_counts[: len(val)] = val
    keep = np.ones(vocab_size, dtype=bool)
    keep[[i for i in skip_ids if 0 <= i < vocab_size]] = False
    probs = np.where(keep, counts + 1.0, 0.0)
    probs /= probs.sum()
    val_counts = np.where(keep, val_counts, 0)
    n_val = int(val_counts.sum())
    if not n_val:
        return float("nan")
    used = val_counts > 0
    nll = -float(np.sum(val_counts[used] * np.log(probs[used]), dtype=np.float64)) / n_val
    return float(np.exp(nll))


def pack_blocks(
    tokenized: Any,
    block_len: int,
    *,
    keep_remainder: bool,
    wrap: tuple[int, int] | None = None,
    what: str = "training text",
) -> PackedBlocks:
    """Cut the concatenated token stream of ``tokenized`` rows (``input_ids``) into blocks of
    ``block_len`` tokens (see ``stages.pretrain.packing.BlockPacker``; the pretrain stage packs text
    through ``stages.pretrain.packing.pack_corpus`` instead, which tokenises and caches too).

    ``wrap=(cls_id, sep_id)`` puts ``cls`` before and ``sep`` after each piece of
    ``block_len - 2`` tokens (MLM). A remainder shorter than a block is kept only when asked
    (and when it has at least 2 tokens). Zero blocks is a UserError, never an empty dataset.
    """
    rows = (row["input_ids"] for row in tokenized)
    return pack_token_rows(rows, block_len, keep_remainder=keep_remainder, wrap=wrap, what=what)


def _pad(features: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [list(f["input_ids"]) for f in features]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class CausalCollator:
    """Pads blocks; labels are the inputs, -100 on padding (by length: pad may equal EOS)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = _pad(features, self.pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def word_start_table(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Per vocabulary id: does this token begin a word? (for whole-word masking)

    A token begins a word when it carries the word-boundary marker of its family (GPT-2 "Ġ",
    SentencePiece "▁", or lacks WordPiece's "##"), or when its text starts with a CJK character:
    Chinese has no spaces, so each character counts as a word rather than a whole line.
    """
    size = len(tokenizer)
    table = np.zeros(size, dtype=bool)
    wordpiece = any(t.startswith("##") for t in list(tokenizer.get_vocab())[:5000])
    for token, index in tokenizer.get_vocab().items():
        if index >= size:
            continue
        if wordpiece:
            starts = not token.startswith("##")
        else:
            starts = token.startswith(("Ġ", "▁"))
        if not starts:
            text = tokenizer.convert_tokens_to_string([token]).strip()
            starts = bool(text) and unicodedata.category(text[0]) == "Lo" and text[0] != "\ufffd"
        table[index] = starts
    return table


class MaskingCollator:
    """MLM masking at ``probability`` with the 80/10/10 rule; optional whole-word masking.

    Masks are a function of ``(seed, batch_serial)`` only; ``batch_serial`` counts the batches
    served and is saved/restored by ``engine.training.train`` so resumed runs mask identically.
    Every sequence gets at least one masked token (an all-unmasked batch would have no loss).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, probability: float, whole_word: bool, seed: int
    ):
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.probability = probability
        self.seed = seed
        self.batch_serial = 0
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.special[torch.tensor(tokenizer.all_special_ids, dtype=torch.long)] = True
        self.word_start = torch.from_numpy(word_start_table(tokenizer)) if whole_word else None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_serial)
        self.batch_serial += 1
        ids, mask = _pad(features, self.pad_id)
        return self.mask(ids, mask, generator)

    def mask(
        self, ids: torch.Tensor, attention: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Mask ``ids`` (padded, with attention mask) using ``generator``; returns model inputs."""
        candidate = (attention == 1) & ~self.special[ids]
        draws = torch.rand(ids.shape, generator=generator)
        if self.word_start is not None:
            # A word is masked when the draw at its first token says so; continuation tokens
            # follow the nearest word start before them.
            starts = self.word_start[ids] | ~candidate
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            start_pos = torch.where(starts, positions, torch.zeros_like(positions))
            start_pos = torch.cummax(start_pos, dim=1).values
            chosen = torch.gather(draws, 1, start_pos) < self.probability
        else:
            chosen = draws < self.probability
        chosen &= candidate
        # Guarantee one masked token per sequence that has any candidate.
        empty = (chosen.sum(dim=1) == 0) & candidate.any(dim=1)
        if empty.any():
            scores = torch.rand(ids.shape, generator=generator).masked_fill(~candidate, -1.0)
            pick = scores.argmax(dim=1)
            rows = torch.nonzero(empty).squeeze(1)
            chosen[rows, pick[rows]] = True
        labels = ids.masked_fill(~chosen, -100)
        action = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[chosen & (action < 0.8)] = self.mask_id
        random_slots = chosen & (action >= 0.8) & (action < 0.9)
        random_ids = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        inputs[random_slots] = random_ids[random_slots]
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


class LossEvaluator:
    """Token-weighted loss over fixed batches: ΣNLL / Σscored tokens (not a mean of batch means).

    ``causal=True`` shifts labels by one (token t predicts t+1); MLM scores the masked positions
    of batches masked once with a fixed seed, so every evaluation sees the same masks.
    """

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], *, causal: bool):
        self.batches = batches
        self.causal = causal

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nll_sum = 0.0
        scored = 0
        for batch in self.batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"].to(device)
            logits = model(**inputs).logits.float()
            if self.causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            nll_sum += float(nll)
            scored += int((labels != -100).sum())
        if scored == 0:
            return {}
        loss = nll_sum / scored
        return {
            "val_loss": loss,
            "val_perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "val_scored_tokens": float(scored),
        }


class EvalBatches(Sequence[dict[str, torch.Tensor]]):
    """The fixed batches of ``blocks``, collated when read rather than held: a validation set
    of a large corpus would not fit in memory as tensors. Batch ``i`` is always built the same
    way: a collator with a ``batch_serial`` (MLM masking) is set to ``i`` first, so its masks
    are those of an in-order pass, identical at every evaluation."""

    def __init__(self, blocks: Any, collate: Any, batch_size: int):
        self.blocks = blocks
        self.collate = collate
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.blocks) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        stop = min(len(self.blocks), (index + 1) * self.batch_size)
        rows = [self.blocks[i] for i in range(index * self.batch_size, stop)]
        if hasattr(self.collate, "batch_serial"):
            self.collate.batch_serial = index
        return self.collate(rows)


def eval_batches(blocks: Any, collate: Any, batch_size: int) -> EvalBatches:
    """The batches of ``blocks`` in order (collated lazily, see ``EvalBatches``)."""
    return EvalBatches(blocks, collate, batch_size)

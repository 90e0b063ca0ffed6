"""Pretraining blocks on disk: tokenise and pack shard by shard, read blocks memory-mapped.

Memory does not grow with the corpus: documents are read ``SHARD_DOCS`` at a time from the
(Arrow, memory-mapped) text dataset, encoded, and cut into blocks that go straight to a file;
only the unfinished tail of the stream (less than one block) is carried to the next shard.
Training reads the block file through ``np.memmap`` (``PackedBlocks``). Per-token counts are
taken while packing, so what the pretrain stage derives from the whole corpus (seen token ids,
the unigram reference) needs no second pass and no copy of it.

Packed corpora are cached (``mlsteps.cache``) under a key made of the text's content, the
tokenizer and the packing settings, so a later run or stage on the same text reuses them.

Encoding: ``tokenizer(texts)`` on a fast tokenizer is the tokenizers library's ``encode_batch``,
which encodes one batch on every core (Rust threads). On this project's 2-core machine that was
as fast as or faster than ``datasets.map(num_proc=2)``, which also pays for pickling rows to
worker processes and writing an intermediate Arrow file (bench/scale_data.py, docs/scale.md);
so mlsteps uses one process and large batches.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlsteps import cache
from mlsteps.engine.filepages import arrow_files as _arrow_files
from mlsteps.engine.filepages import release_file_pages
from mlsteps.errors import HERE, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Documents per shard: large enough that encode_batch keeps every core busy, small enough that
# a shard's Python lists stay a few MB.
SHARD_DOCS = 4096
# Pages of memory-mapped files count in a process's RSS once touched, and stay until unmapped or
# reclaimed: dropped from our mappings every this many bytes read, so that peak RSS stays flat
# (engine/filepages.py).
RELEASE_BYTES = 64 << 20
BLOCKS_FILE = "blocks.int32"
COUNTS_FILE = "counts.int64"
FORMAT_VERSION = 1


class BlockPacker:
    """Cut a stream of token chunks into blocks of ``block_len`` tokens, written to ``sink``.

    ``wrap=(cls_id, sep_id)`` puts ``cls`` before and ``sep`` after each piece of
    ``block_len - 2`` tokens (MLM). Every block is ``block_len`` long except a kept remainder.
    """

    def __init__(self, sink: Any, block_len: int, wrap: tuple[int, int] | None = None):
        self.sink = sink
        self.block_len = block_len
        self.wrap = wrap
        self.body = block_len - 2 if wrap else block_len
        self.pending = np.zeros(0, dtype=np.int32)
        self.tokens_in = 0
        self.n_blocks = 0
        self.n_tokens = 0
        self.last_len = block_len
        self.counts = np.zeros(0, dtype=np.int64)

    def _emit(self, pieces: np.ndarray) -> None:
        if self.wrap is not None:
            cls_id, sep_id = self.wrap
            rows = pieces.shape[0]
            pieces = np.concatenate(
                [
                    np.full((rows, 1), cls_id, np.int32),
                    pieces,
                    np.full((rows, 1), sep_id, np.int32),
                ],
                axis=1,
            )
        flat = np.ascontiguousarray(pieces, dtype=np.int32).reshape(-1)
        self.sink.write(flat.tobytes())
        counts = np.bincount(flat)
        if len(counts) > len(self.counts):
            counts[: len(self.counts)] += self.counts
            self.counts = counts.astype(np.int64)
        else:
            self.counts[: len(counts)] += counts
        self.n_blocks += pieces.shape[0]
        self.n_tokens += len(flat)
        self.last_len = pieces.shape[1]

    def feed(self, ids: np.ndarray) -> None:
        """Append ``ids`` (int32) to the stream, writing every block it completes."""
        self.tokens_in += len(ids)
        stream = np.concatenate([self.pending, ids.astype(np.int32, copy=False)])
        full = len(stream) // self.body
        if full:
            self._emit(stream[: full * self.body].reshape(full, self.body))
        self.pending = stream[full * self.body :].copy()

    def finish(self, *, keep_remainder: bool, what: str) -> None:
        """Write the kept remainder (at least 2 tokens); zero blocks is a UserError."""
        if keep_remainder and len(self.pending) >= 2:
            self._emit(self.pending.reshape(1, -1))
            self.pending = self.pending[:0]
        if self.n_blocks == 0:
            raise UserError(
                f"the {what} has {self.tokens_in} tokens, fewer than one block of max_seq_len "
                f"{self.block_len}",
                field=HERE,
                hint="add text, lower max_seq_len, or set keep_remainder: true",
            )

    def manifest(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "block_len": self.block_len,
            "n_blocks": self.n_blocks,
            "n_tokens": self.n_tokens,
            "last_len": self.last_len,
            "stream_tokens": self.tokens_in,
        }


class PackedBlocks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Blocks of a packed corpus, read from its file (memory-mapped, or loaded with
    ``in_memory=True``). Row ``i`` is ``{"input_ids": [...]}``, as from a ``datasets.Dataset``."""

    def __init__(self, path: Path, *, in_memory: bool = False):
        self.path = Path(path)
        info = json.loads((self.path / cache.MANIFEST).read_text(encoding="utf-8"))
        self.block_len = int(info["block_len"])
        self.n_blocks = int(info["n_blocks"])
        self.n_tokens = int(info["n_tokens"])
        self.in_memory = in_memory
        self._tokens: np.ndarray | None = None
        self._served = 0

    def _data(self) -> np.ndarray:
        if self._tokens is None:
            file = self.path / BLOCKS_FILE
            if self.in_memory:
                self._tokens = np.fromfile(file, dtype=np.int32, count=self.n_tokens)
            else:
                self._tokens = np.memmap(file, dtype=np.int32, mode="r", shape=(self.n_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return self.n_blocks

    def block(self, index: int) -> np.ndarray:
        """Block ``index`` as an int32 array (a view into the file)."""
        if index < 0:
            index += self.n_blocks
        if not 0 <= index < self.n_blocks:
            raise IndexError(index)
        start = index * self.block_len
        data = self._data()
        self._served += self.block_len * 4
        if self._served >= RELEASE_BYTES and isinstance(data, np.memmap):
            self._served = 0
            data._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]
        return data[start : min(start + self.block_len, self.n_tokens)]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.block(int(index)).tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for i in range(self.n_blocks):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would carry the whole file along (DataLoader workers reopen it).
        return {**self.__dict__, "_tokens": None}

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs in the blocks (index = id)."""
        return np.fromfile(self.path / COUNTS_FILE, dtype=np.int64)

    def chunks(self, tokens: int = 1 << 24) -> Iterator[np.ndarray]:
        """All tokens, ``tokens`` at a time, read with plain file reads (no mapping kept)."""
        with open(self.path / BLOCKS_FILE, "rb") as handle:
            while chunk := handle.read(tokens * 4):
                yield np.frombuffer(chunk, dtype=np.int32)


def _write_entry(
    folder: Path, feed: Callable[[BlockPacker], None], **finish: Any
) -> dict[str, Any]:
    with open(folder / BLOCKS_FILE, "wb") as sink:
        packer = BlockPacker(sink, finish.pop("block_len"), finish.pop("wrap"))
        feed(packer)
        packer.finish(**finish)
    packer.counts.tofile(folder / COUNTS_FILE)
    manifest = packer.manifest()
    # Complete enough to open (PackedBlocks reads it); cache.publish rewrites it with the marker.
    (folder / cache.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


def pack_token_rows(
    rows: Iterable[Iterable[int]],
    block_len: int,
    *,
    keep_remainder: bool,
    wrap: tuple[int, int] | None = None,
    what: str = "training text",
) -> PackedBlocks:
    """Pack already tokenised rows into a private temporary folder (removed with the object)."""
    folder = Path(tempfile.mkdtemp(prefix="mlsteps-blocks-"))

    def feed(packer: BlockPacker) -> None:
        for row in rows:
            packer.feed(np.asarray(list(row), dtype=np.int32))

    try:
        _write_entry(
            folder,
            feed,
            block_len=block_len,
            wrap=wrap,
            keep_remainder=keep_remainder,
            what=what,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    blocks = PackedBlocks(folder)
    weakref.finalize(blocks, shutil.rmtree, str(folder), True)
    return blocks


def _hash_array(h: Any, arr: Any) -> None:
    import pyarrow as pa

    h.update(f"{arr.type}|{len(arr)}|{arr.null_count}|".encode())
    if arr.null_count:
        h.update(np.asarray(arr.is_null()).tobytes())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        # Only the bytes this (possibly sliced) array uses, offsets made relative.
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], dtype=width)[
            arr.offset : arr.offset + len(arr) + 1
        ]
        if len(offsets):
            data = arr.buffers()[2]
            if data is not None:
                h.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
            h.update((offsets - offsets[0]).astype(np.int64).tobytes())
    elif pa.types.is_integer(arr.type):
        h.update(arr.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    else:
        h.update(repr(arr.to_pylist()).encode())


def corpus_fingerprint(ds: Any, text_column: str) -> str:
    """A digest of the text ``ds`` holds in ``text_column`` (and of its row selection): equal
    text gives an equal digest wherever the Arrow files live; any changed byte changes it."""
    h = hashlib.blake2b(digest_size=20)
    files, read = _arrow_files(ds), 0
    for chunk in ds.data.table.column(text_column).chunks:
        _hash_array(h, chunk)
        read += chunk.nbytes
        if read >= RELEASE_BYTES:
            release_file_pages(files)
            read = 0
    release_file_pages(files)
    h.update(b"|indices|")
    if ds._indices is not None:
        for chunk in ds._indices.column(0).chunks:
            _hash_array(h, chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides a tokenizer's ids (its full serialised state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = [type(tokenizer).__name__, sorted(map(str, tokenizer.all_special_tokens))]
    return hashlib.blake2b((body + json.dumps(extra)).encode(), digest_size=20).hexdigest()


def _batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """texts -> ids without special tokens. A fast tokenizer's backend is called directly
    (``encode_batch_fast``: every core, no offsets): the ``tokenizer(texts)`` wrapper builds a
    Python dict per document, which cost about a third of the throughput (bench/scale_data.py).
    The ids are the same (tests/integration/test_scale_data.py compares with the wrapper)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]


def _encode_shards(
    ds: Any, tokenizer: PreTrainedTokenizerBase, text_column: str, end_id: int
) -> Iterator[np.ndarray]:
    """Each shard of documents as one int32 stream: ids of each non-empty text, then ``end_id``."""
    encode = _batch_encoder(tokenizer)
    files, read = _arrow_files(ds), 0
    for batch in ds.iter(batch_size=SHARD_DOCS):
        texts = [t for t in batch[text_column] if isinstance(t, str) and t]
        read += sum(len(t) for t in texts)
        if read >= RELEASE_BYTES:
            release_file_pages(files)
            read = 0
        if not texts:
            continue
        ids = encode(texts)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        yield np.insert(flat, np.cumsum(lengths), np.int32(end_id))


def pack_corpus(
    ds: Any,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    *,
    end_id: int,
    block_len: int,
    keep_remainder: bool,
    wrap: tuple[int, int] | None,
    what: str = "training text",
    log: Callable[[str], None] | None = None,
    fingerprint: str | None = None,
) -> PackedBlocks:
    """Tokenise the ``text_column`` of ``ds`` and pack it, through the cache (see module doc).
    ``ds`` is a ``datasets.Dataset``, keyed by its content, or a streamed ``IterableDataset``
    with the ``fingerprint`` of its identity (``stages.pretrain.streaming``)."""
    settings = {
        "corpus": fingerprint or corpus_fingerprint(ds, text_column),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "end_id": end_id,
        "block_len": block_len,
        "keep_remainder": keep_remainder,
        "wrap": list(wrap) if wrap else None,
        "version": FORMAT_VERSION,
    }
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
    name = key.hexdigest()
    found = cache.lookup(name)
    if found is not None:
        if log:
            log(f"packed {what}: reusing cache entry {found}")
        return PackedBlocks(found)

    def feed(packer: BlockPacker) -> None:
        for ids in _encode_shards(ds, tokenizer, text_column, end_id):
            packer.feed(ids)

    folder = cache.begin(name)
    try:
        manifest = _write_entry(
            folder,
            feed,
            block_len=block_len,
            wrap=wrap,
            keep_remainder=keep_remainder,
            what=what,
        )
        final = cache.publish(
            folder, name, {**manifest, "settings": settings, "what": what, "pid": os.getpid()}
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if log:
        log(f"packed {what}: {manifest['n_blocks']:,} blocks written to {final}")
    return PackedBlocks(final)

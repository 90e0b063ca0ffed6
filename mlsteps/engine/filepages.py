"""Keep pages of memory-mapped files that a pass has already read out of the resident set.

``datasets`` reads its Arrow cache files memory-mapped: every page a pass over the text touches
counts in the process's RSS until it is unmapped or reclaimed, so without this a single pass over
a corpus grows RSS by the corpus's size (bench/scale_data.py measured +330 MB of file-backed pages
at 400 MB of text). ``madvise(MADV_DONTNEED)`` on a read-only file mapping drops those pages from
this process only: the kernel keeps them in its page cache, and a later read maps them again
without disk I/O, with the same contents.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Bytes a pass reads between two releases: small against the corpus, large enough that the
# /proc/self/maps scan and the madvise calls cost nothing measurable.
RELEASE_BYTES = 64 << 20


def release_file_pages(paths: Iterable[str]) -> None:
    """Drop this process's resident pages of its read-only mappings of ``paths`` (Arrow cache
    files). Only mappings of exactly those files, as /proc/self/maps lists them, are touched:
    their contents come back from the file on the next read. A no-op where /proc is absent."""
    wanted = {os.path.realpath(p) for p in paths}
    if not wanted:
        return
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1] or os.path.realpath(parts[5]) not in wanted:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def arrow_files(ds: Any) -> list[str]:
    """The Arrow cache files a ``datasets.Dataset`` reads (none for an in-memory or streamed one)."""
    try:
        return [f["filename"] for f in ds.cache_files]
    except (AttributeError, KeyError, TypeError):
        return []


class PageReleaser:
    """Count the bytes a pass over ``files`` has read; release their pages every ``every``."""

    def __init__(self, files: list[str], every: int | None = None):
        self.files = files
        self.every = RELEASE_BYTES if every is None else every
        self.read = 0

    def add(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.every:
            self.release()

    def release(self) -> None:
        self.read = 0
        release_file_pages(self.files)

"""Checkpoint completeness: a checkpoint counts only once a manifest marker is written last.

The transformers Trainer writes ``checkpoint-N/`` file by file; a crash or a full disk can leave a
directory that looks like a checkpoint but is not one. We write ``COMPLETE`` (a JSON manifest of
every file, its size and its sha256) after fsync-ing everything else, and only ever resume from a
checkpoint whose manifest is present and whose files still have the recorded sizes and digests
and, for safetensors weights, a header that covers the whole file. The digests catch damage that
keeps the size (bytes overwritten in place); manifests written before digests were recorded are
checked by size only, so older run directories still resume. Incomplete checkpoints are deleted
on sight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Collection
from pathlib import Path

from mlsteps.rundir import fsync_dir

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step of a ``checkpoint-N`` directory, or None for other names."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """All ``checkpoint-N`` directories, oldest (lowest step) first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (about 1.3 GB/s with SHA CPU instructions)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def mark_complete(checkpoint: Path, step: int) -> None:
    """fsync every file of ``checkpoint`` then write the ``COMPLETE`` manifest last."""
    files: dict[str, int] = {}
    digests: dict[str, str] = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            _fsync_file(path)
            name = str(path.relative_to(checkpoint))
            files[name] = path.stat().st_size
            digests[name] = file_sha256(path)
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        # "files" keeps its old shape (name -> size) so older readers still understand it.
        json.dump({"step": step, "files": files, "sha256": digests}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / COMPLETE_MARKER)
    fsync_dir(checkpoint)


def safetensors_intact(path: Path) -> bool:
    """True when the file's header parses and its tensors end exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                return False
            (header_len,) = struct.unpack("<Q", raw)
            if header_len <= 0 or 8 + header_len > size:
                return False
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not offsets or len(offsets) != 2:
            return False
        end = max(end, int(offsets[1]))
    return bool(8 + header_len + end == size)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete and intact."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return "no COMPLETE marker (the write was interrupted)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files: dict[str, int] = manifest["files"]
        digests: dict[str, str] = manifest.get("sha256") or {}  # absent in older manifests
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable COMPLETE marker"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
        if name.endswith(".safetensors") and not safetensors_intact(path):
            return f"{name} is not a valid safetensors file"
        if name in digests and file_sha256(path) != digests[name]:
            return f"{name} does not match its sha256 (damaged after it was written)"
    if not any(name.endswith(".safetensors") for name in files):
        return "no model weights"
    return None


def newest_complete_checkpoint(
    checkpoints_dir: Path, log: Callable[[str], None] | None = None
) -> Path | None:
    """The newest resumable checkpoint. Incomplete or damaged ones are removed (and logged)."""
    for checkpoint in reversed(list_checkpoints(checkpoints_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if log is not None:
            log(f"ignoring and removing {checkpoint.name}: {problem}")
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def rotate_checkpoints(
    checkpoints_dir: Path, keep: int, protected: Collection[int | None] = ()
) -> None:
    """Keep the newest ``keep`` complete checkpoints (and those of the ``protected`` steps: the
    best one); drop older ones and stale incomplete ones."""
    checkpoints = list_checkpoints(checkpoints_dir)
    complete = [c for c in checkpoints if (c / COMPLETE_MARKER).is_file()]
    newest = checkpoint_step(complete[-1]) if complete else None
    for checkpoint in checkpoints:
        is_complete = checkpoint in complete
        if is_complete and (
            checkpoint in complete[-keep:] or checkpoint_step(checkpoint) in protected
        ):
            continue
        # An incomplete directory older than the newest complete one is a leftover of a crash.
        if not is_complete and (newest is None or (checkpoint_step(checkpoint) or 0) > newest):
            continue
        shutil.rmtree(checkpoint, ignore_errors=True)


def write_dir_atomically(final: Path, write: Callable[[Path], object]) -> Path:
    """Fill ``final`` via ``write(tmp_dir)`` so that readers see the old or the new dir, never half.

    ``write`` fills ``<final>.tmp/``; its files are fsynced, then it is renamed over ``final``.
    """
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final

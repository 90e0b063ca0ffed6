"""The packed-data cache: entries mlsteps wrote, listed and cleared without touching anything else.

Layout: ``<root>/packed/<key>/`` holds one packed corpus (``stages.pretrain.packing``) and a
``manifest.json`` whose ``format`` is :data:`ENTRY_FORMAT`; that marker is what makes a folder
ours. An entry is built in ``<root>/packed/.partial-<key>-<pid>-<n>/`` (marked by a
``PARTIAL.json`` naming the writing process) and renamed into place when complete, so a reader
never sees half an entry and a killed writer leaves only a partial folder that ``clear`` removes.

The root is ``$MLSTEPS_CACHE``, else ``$XDG_CACHE_HOME/mlsteps``, else ``~/.cache/mlsteps``.
Light imports only: ``mlsteps cache ls|clear`` must not load torch or datasets.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "MLSTEPS_CACHE"
ENTRY_FORMAT = "mlsteps-packed-blocks"
PARTIAL_FORMAT = "mlsteps-packed-blocks-partial"
MANIFEST = "manifest.json"
PARTIAL_MARKER = "PARTIAL.json"
_PARTIAL_PREFIX = ".partial-"
_serial = itertools.count()


def cache_root() -> Path:
    """Where packed data lives (see the module docstring for the order of precedence)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlsteps"


def packed_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "packed"


@dataclass(frozen=True)
class Entry:
    """One complete cache entry (``manifest`` is its parsed manifest.json)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of ``path`` when it is a complete mlsteps entry, else None."""
    try:
        value = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict) or value.get("format") != ENTRY_FORMAT:
        return None
    return value


def entries(root: Path | None = None) -> list[Entry]:
    """Complete entries, oldest first."""
    base = packed_dir(root)
    if not base.is_dir():
        return []
    found = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
            manifest = read_manifest(child)
            if manifest is not None:
                found.append(Entry(child, manifest))
    return sorted(found, key=lambda e: float(e.manifest.get("created", 0)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partials(root: Path | None = None, *, include_live: bool = False) -> list[Path]:
    """Partial entries (ours, by marker) whose writer is gone (or all, with ``include_live``)."""
    base = packed_dir(root)
    if not base.is_dir():
        return []
    out = []
    for child in sorted(base.iterdir()):
        if not (child.name.startswith(_PARTIAL_PREFIX) and child.is_dir()) or child.is_symlink():
            continue
        try:
            marker = json.loads((child / PARTIAL_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(marker, dict) or marker.get("format") != PARTIAL_FORMAT:
            continue
        if include_live or not _pid_alive(int(marker.get("pid", 0))):
            out.append(child)
    return out


def clear(root: Path | None = None) -> tuple[int, int]:
    """Remove every complete entry and every abandoned partial entry; returns (count, bytes).

    Only folders carrying mlsteps' own marker are removed; anything else under the root stays.
    """
    count = size = 0
    for entry in entries(root):
        size += entry.size_bytes
        # Unmark first: a clear interrupted half-way leaves no folder that still looks complete.
        (entry.path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(entry.path, ignore_errors=True)
        count += 1
    for partial in partials(root):
        size += sum(p.stat().st_size for p in partial.iterdir() if p.is_file())
        shutil.rmtree(partial, ignore_errors=True)
        count += 1
    return count, size


def begin(key: str, root: Path | None = None) -> Path:
    """A fresh, marked partial folder in which to build entry ``key``."""
    base = packed_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{_PARTIAL_PREFIX}{key}-{os.getpid()}-{next(_serial)}"
    tmp.mkdir()
    marker = {"format": PARTIAL_FORMAT, "pid": os.getpid(), "started": time.time()}
    (tmp / PARTIAL_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return tmp


def publish(tmp: Path, key: str, manifest: dict[str, Any], root: Path | None = None) -> Path:
    """Finish ``tmp`` (manifest last, fsynced) and rename it to entry ``key``.

    When another process published the same key first, its entry wins and ``tmp`` is removed:
    equal keys mean equal content.
    """
    body = dict(manifest, format=ENTRY_FORMAT, created=time.time())
    for name in os.listdir(tmp):
        if name != PARTIAL_MARKER:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    manifest_tmp = tmp / (MANIFEST + ".tmp")
    with open(manifest_tmp, "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(manifest_tmp, tmp / MANIFEST)
    final = packed_dir(root) / key
    try:
        os.rename(tmp, final)
    except OSError:
        if read_manifest(final) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    # The marker goes last: a kill before this line leaves a complete entry that still names
    # its writer, which is harmless (the manifest decides completeness).
    (final / PARTIAL_MARKER).unlink(missing_ok=True)
    return final


def lookup(key: str, root: Path | None = None) -> Path | None:
    """The complete entry ``key``, or None."""
    path = packed_dir(root) / key
    return path if read_manifest(path) is not None else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

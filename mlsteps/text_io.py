"""Atomic JSONL files: predictions, prompt previews, the builtin data sets.

One object per line (UTF-8, non-ASCII kept as is), written to ``<name>.tmp``, fsynced and renamed
over ``<name>``: a reader never sees half a file, and a write killed midway leaves only
``<name>.tmp``, which the next write of the same file replaces (a fixed name, unlike the run-level
files' mkstemp names, so a resumed stage leaves no stray temp files behind).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``records`` to ``path`` as JSON lines, atomically; values JSON cannot hold become
    their ``str``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path

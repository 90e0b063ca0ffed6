"""Run-directory primitives: atomic writes, the run lock, env.json.

Every run-level file is written to a temporary file in the same folder, fsynced and renamed, so
a kill at any moment leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from mlsteps.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically: temp file in the same directory + fsync + rename + dir fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"corrupt JSON file: {exc}", where=str(path), hint="delete it to start over"
        ) from None


class RunLock:
    """Exclusive lock on a run directory, held for the life of the process.

    Uses flock, which the kernel drops when the holder dies, so a lock left by a killed
    process is taken over automatically; the pid inside is only for the error message.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise UserError(
                f"run directory is in use by another mlsteps run ({holder})",
                where=str(self.path.parent),
                hint="wait for it to finish, or pass a different --run-dir",
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Versions of the stack, the git sha if any, and the device; written to env.json."""
    packages = [
        "mlsteps",
        "torch",
        "transformers",
        "datasets",
        "tokenizers",
        "peft",
        "accelerate",
        "sacrebleu",
        "rouge-score",
        "pydantic",
        "numpy",
    ]
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "packages": {p: _version(p) for p in packages},
        "git_sha": _git_sha(),
    }
    # The device needs torch, which costs seconds to import: report it only once a stage has
    # loaded torch (the runner rewrites env.json after each stage).
    torch = sys.modules.get("torch")
    if torch is None:
        info["device"] = {"type": "not yet known (no stage has loaded torch)"}
    elif torch.cuda.is_available():
        info["device"] = {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "bf16": bool(torch.cuda.is_bf16_supported()),
        }
    else:
        info["device"] = {"type": "cpu", "threads": torch.get_num_threads()}
    return info

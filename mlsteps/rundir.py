"""Run-directory primitives: atomic writes, the run lock, env.json.

Every run-level file is written to a temporary file in the same folder, fsynced and renamed, so
a kill at any moment leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import math
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

# The run-level files; their temporary files (``.state.json.XXXXXXXX.tmp``) are the only loose
# files mlsteps ever removes from the top of a run directory.
RUN_FILES = ("state.json", "metrics.json", "report.md", "env.json", "recipe.yaml")
# What a run directory may hold before its state.json exists (a run killed at its very start).
_PRE_STATE_ENTRIES = (".lock", ".write-test")
STATUSES = ("pending", "running", "done", "failed")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically: temp file in the same directory + fsync + rename + dir fsync.

    mkstemp creates its file 0600 whatever the umask; the result gets the mode any other file
    would (0666 minus the umask), like the stage files next to it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError:
            pass  # a filesystem without modes (FAT, some network mounts): its default stands
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def finite_json(value: Any, problems: list[str] | None = None, where: str = "") -> Any:
    """``value`` with every non-finite float replaced by null: strict JSON has no NaN/Infinity.

    In a mapping, ``key: nan`` becomes ``key: null`` plus ``key_error: "non-finite (nan)"`` so the
    reason stays next to the number; each replacement is appended to ``problems`` as a dotted path.
    """
    if isinstance(value, float) and not math.isfinite(value):
        if problems is not None:
            problems.append(f"{where or 'value'} = {value}")
        return None
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            out[key] = finite_json(item, problems, place)
            if out[key] is None and isinstance(item, float):
                out[f"{key}_error"] = f"non-finite ({item})"
        return out
    if isinstance(value, list | tuple):
        return [finite_json(v, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    """Strict JSON (no NaN/Infinity, which strict parsers refuse), written atomically."""
    text = json.dumps(finite_json(data), indent=2, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


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


_MISSING = object()


def read_json(path: Path, default: Any = None, *, hint: str = "delete it to start over") -> Any:
    """Parsed JSON, ``default`` when the file does not exist; corrupt JSON is a UserError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except IsADirectoryError:
        raise UserError(
            "a directory where a JSON file belongs", where=str(path), hint=hint
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt JSON file: {exc}", where=str(path), hint=hint) from None


_STATE_HINT = (
    "nothing was changed; restore state.json from a backup, or move the run directory away "
    "and run again into a new --run-dir"
)


def _state_problem(state: Any) -> str | None:
    """Why ``state`` is not a state.json mlsteps wrote (None when it is one)."""
    if not isinstance(state, dict):
        return f"the top level is {json.dumps(state)[:40]}, not a mapping"
    if not isinstance(state.get("stages"), dict):
        return "'stages' is missing or not a mapping of stage name -> record"
    if "name" in state and not isinstance(state["name"], str):
        return "'name' is not a string"
    for name, entry in state["stages"].items():
        if not isinstance(entry, dict):
            return f"stages.{name} is {json.dumps(entry)[:40]}, not a record"
        if entry.get("status") not in STATUSES:
            return f"stages.{name}.status is {json.dumps(entry.get('status'))[:40]}"
        if not isinstance(entry.get("fingerprint", ""), str):
            return f"stages.{name}.fingerprint is not a string"
        outputs = entry.get("outputs", {})
        if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
            return f"stages.{name}.outputs is not a mapping of name -> path"
    return None


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's state.json (None when there is none); anything else than a state that
    mlsteps wrote is a UserError naming the file: a misread state would delete or retrain."""
    path = run_dir / "state.json"
    state = read_json(path, _MISSING, hint=_STATE_HINT)
    if state is _MISSING:
        return None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"not a valid mlsteps state: {problem}", where=str(path), hint=_STATE_HINT)
    return state  # type: ignore[no-any-return]


def is_own_temp_file(name: str) -> bool:
    """A temporary file of an atomic write of a run-level file (left by a kill)."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def check_run_dir(run_dir: Path, recipe_name: str, *, force: bool) -> dict[str, Any] | None:
    """Refuse a directory mlsteps does not own, before anything is written into it.

    A run directory is mlsteps' own when it holds a valid state.json (or nothing but what a run
    killed before writing one leaves). It belongs to one recipe name; another recipe may take it
    over only with ``--force``. Returns the state (None for a new or empty directory).
    """
    if not run_dir.is_dir():
        return None  # created later (or refused as unwritable)
    try:
        state = read_state(run_dir)
        entries = sorted(p.name for p in run_dir.iterdir())
    except PermissionError as exc:
        raise UserError(
            f"cannot read the run directory: {exc.strerror}",
            where=str(run_dir),
            hint="pick a readable --run-dir",
        ) from None
    if state is None:
        foreign = [
            e for e in entries if e not in _PRE_STATE_ENTRIES and not e.startswith(".state.json.")
        ]
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            )
            raise UserError(
                f"not an mlsteps run directory: it holds {shown} and no state.json",
                where=str(run_dir),
                hint="pass a new or empty --run-dir (mlsteps only writes into run directories "
                "it created, so nothing of yours there is overwritten or deleted)",
            )
        return None
    owner = state.get("name")
    if owner is not None and owner != recipe_name and not force:
        raise UserError(
            f"the run directory belongs to recipe '{owner}', not '{recipe_name}'",
            where=str(run_dir),
            hint=f"pass another --run-dir (default runs/{recipe_name}), or --force to hand it "
            f"to '{recipe_name}' (every stage runs again; '{owner}'s other stage folders are kept)",
        )
    return state


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

"""A stage's folders in a run directory, and how a re-run replaces them without losing anything.

- ``<stage>/`` holds the stage's results; ``<stage>/stage.json`` is the stage's own record of them
  (fingerprint, times, outputs, metrics), written once they are complete. metrics.json and the
  state of a finished stage can be rebuilt from it.
- A stage that already has results and must run again (changed, ``--force``, a changed upstream)
  is built aside in ``.<stage>.next/`` (marked by ``attempt.json``) and swapped in only when it is
  complete: ``<stage>`` -> ``.<stage>.old``, ``.<stage>.next`` -> ``<stage>``, state.json, then
  ``.<stage>.old`` is deleted. A failed or interrupted build leaves the last good results, state
  and report as they were; an interrupted one resumes from its own checkpoints in
  ``.<stage>.next/checkpoints`` when its fingerprint is unchanged.
- A kill anywhere in the swap is repaired by :func:`recover` at the start of the next run.

Stage names start with a letter or digit, so the dot-names can never be another stage's folder.
Only folders of stages that state.json records are ever renamed or removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mlsteps.errors import UserError
from mlsteps.rundir import atomic_write_json, fsync_dir

RECORD = "stage.json"
ATTEMPT = "attempt.json"


def next_dir(run_dir: Path, name: str) -> Path:
    return run_dir / f".{name}.next"


def old_dir(run_dir: Path, name: str) -> Path:
    return run_dir / f".{name}.old"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's own record of complete results (None when absent or not one of ours)."""
    rec = _read(stage_dir / RECORD)
    if rec is None or not isinstance(rec.get("fingerprint"), str):
        return None
    if not isinstance(rec.get("metrics"), dict) or not isinstance(rec.get("outputs", {}), dict):
        return None
    return rec


def write_record(stage_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(stage_dir / RECORD, record)


def entry_of(record: dict[str, Any]) -> dict[str, Any]:
    """The state.json entry of a finished stage, from its record."""
    return {k: v for k, v in record.items() if k not in ("metrics", "stage")}


def attempt_fingerprint(run_dir: Path, name: str) -> str | None:
    """Fingerprint of the aside build of ``name`` (None when there is none)."""
    attempt = _read(next_dir(run_dir, name) / ATTEMPT)
    return attempt.get("fingerprint") if attempt else None


def remove_build(run_dir: Path, name: str) -> None:
    """Delete the aside build of ``name``: only an empty folder or one mlsteps marked as its own."""
    nxt = next_dir(run_dir, name)
    if not nxt.exists() and not nxt.is_symlink():
        return
    if nxt.is_dir() and not nxt.is_symlink():
        if not any(nxt.iterdir()) or (nxt / ATTEMPT).is_file() or (nxt / RECORD).is_file():
            shutil.rmtree(nxt)
            return
    raise UserError(
        f"'{nxt.name}' was not made by mlsteps (no {ATTEMPT} in it)",
        where=str(nxt),
        hint="move it out of the run directory, then run again",
    )


def start_build(run_dir: Path, name: str, fingerprint: str, started_at: str) -> Path:
    """A fresh aside build folder for ``name``, marked as mlsteps' own."""
    remove_build(run_dir, name)
    nxt = next_dir(run_dir, name)
    nxt.mkdir()
    mark_attempt(nxt, fingerprint=fingerprint, status="running", started_at=started_at)
    return nxt


def mark_attempt(build: Path, **fields: Any) -> None:
    """Record what happened to an aside build in its attempt.json (never fails the run)."""
    attempt = _read(build / ATTEMPT) or {}
    attempt.update(fields)
    try:
        atomic_write_json(build / ATTEMPT, attempt)
    except OSError:
        pass  # the stage's own error is the one to report


def swap_in(run_dir: Path, name: str) -> None:
    """Put the complete aside build in place; the previous results go to ``.<stage>.old``."""
    cur, nxt, old = run_dir / name, next_dir(run_dir, name), old_dir(run_dir, name)
    (nxt / ATTEMPT).unlink(missing_ok=True)  # stage.json now says it is complete
    if old.exists():
        shutil.rmtree(old)
    if cur.exists():
        os.replace(cur, old)
    os.replace(nxt, cur)
    fsync_dir(run_dir)


def drop_old(run_dir: Path, name: str) -> None:
    shutil.rmtree(old_dir(run_dir, name), ignore_errors=True)


def recover(run_dir: Path, state: dict[str, Any]) -> None:
    """Finish or undo a swap a kill cut short (only for stages state.json records)."""
    for name in state["stages"]:
        cur, nxt, old = run_dir / name, next_dir(run_dir, name), old_dir(run_dir, name)
        if read_record(nxt) is not None:
            # The build was complete (its record is written last): finish the swap it began.
            if cur.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(cur, old)
            os.replace(nxt, cur)
            fsync_dir(run_dir)
        elif not cur.exists() and old.is_dir():
            os.replace(old, cur)
        if old.exists() and cur.exists():
            shutil.rmtree(old)


def adopt_records(run_dir: Path, state: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Bring state.json and metrics.json up to the stages' own records.

    A stage whose record is newer than its state entry (killed after its results were complete,
    before state.json said so) becomes done; a done stage missing from metrics.json (deleted,
    lost) gets its metrics back. Returns whether anything changed.
    """
    changed = False
    for name, entry in state["stages"].items():
        rec = read_record(run_dir / name)
        if rec is None:
            continue
        if entry.get("status") != "done" or entry.get("fingerprint") != rec["fingerprint"]:
            state["stages"][name] = entry_of(rec)
            metrics[name] = rec["metrics"]
            changed = True
        elif name not in metrics:
            metrics[name] = rec["metrics"]
            changed = True
    return changed


def relative_outputs(
    run_dir: Path, build: Path, name: str, outputs: dict[str, str]
) -> dict[str, str]:
    """Outputs relative to the run dir, as they are once the build is in place at ``<stage>/``
    (so a moved run directory still skips correctly)."""
    rel = {}
    for key, value in outputs.items():
        path = Path(value).resolve()
        try:
            rel[key] = str(Path(name) / path.relative_to(build.resolve()))
        except ValueError:
            try:
                rel[key] = str(path.relative_to(run_dir.resolve()))
            except ValueError:
                rel[key] = str(value)
    return rel


def outputs_exist(run_dir: Path, entry: dict[str, Any]) -> bool:
    """A done stage is only skipped while everything it reported as output is still there."""
    return all((run_dir / p).exists() for p in entry.get("outputs", {}).values())

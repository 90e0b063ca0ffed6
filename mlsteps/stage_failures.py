"""What a stage's exception becomes: exit 1 (failed), 2 (the user's to fix: bad input, a full
or read-only disk) or 130 (interrupted), and how a failure is recorded."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path
from typing import Any

from mlsteps.errors import MlstepsError, StageFailed, StageInterrupted, UserError


def stage_failure(exc: BaseException, name: str, stage_dir: Path, run_dir: Path) -> MlstepsError:
    """The error to raise for an exception of stage ``name`` (exit code 1, 2 or 130)."""
    failed = _disk_error(exc, name, stage_dir, run_dir)
    if isinstance(failed, MlstepsError):
        return failed
    if isinstance(failed, KeyboardInterrupt):
        return StageInterrupted(
            f"stage '{name}' aborted", hint="run the same command again to resume"
        )
    return StageFailed(f"stage '{name}' failed: {type(exc).__name__}: {exc}")


def error_text(failure: MlstepsError) -> str:
    if isinstance(failure, StageInterrupted):
        return f"interrupted: {failure}"
    return str(failure)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_FULL_DISK_BYTES = 1 << 20  # under 1 MiB free, a failed write was a full disk


def _disk_error(exc: BaseException, stage: str, stage_dir: Path, run_dir: Path) -> BaseException:
    """A full or read-only disk is the user's to fix: say where and how, keep the cause."""
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        # torch and safetensors report a full disk in their own words ("unexpected pos",
        # SafetensorError): ask the disk itself.
        try:
            full = shutil.disk_usage(run_dir).free < _FULL_DISK_BYTES
        except OSError:
            full = False
        if not full or isinstance(exc, StageInterrupted | KeyboardInterrupt | UserError):
            return exc
        what, filename = "disk full (No space left on device)", None
    else:
        assert isinstance(cause, OSError)
        what = (
            "disk full (No space left on device)"
            if cause.errno != errno.EROFS
            else "read-only file system"
        )
        filename = cause.filename
    _drop_incomplete_checkpoints(stage_dir)
    failed = StageFailed(
        f"{what} while writing {filename or run_dir}",
        where=f"stages.{stage}",
        hint=f"free space for {run_dir} (or pass another --run-dir), then run the same command "
        "again to resume from the last complete checkpoint",
    )
    failed.__cause__ = exc
    return failed


def _drop_incomplete_checkpoints(stage_dir: Path) -> None:
    """A checkpoint cut short by the full disk is never resumed from; deleting it now frees the
    space the run needs to record its failure."""
    from mlsteps.engine.checkpoints import COMPLETE_MARKER

    for ckpt in (stage_dir / "checkpoints").glob("checkpoint-*"):
        if ckpt.is_dir() and not (ckpt / COMPLETE_MARKER).exists():
            shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(stage_dir / "final.tmp", ignore_errors=True)


def record_failure(save_state: Any, write_report: Any) -> None:
    """Write the failed state; if even that fails (full disk), the stage's error still wins."""
    try:
        save_state()
        write_report()
    except OSError as exc:
        print(f"warning: could not record the failure in state.json: {exc}", file=sys.stderr)

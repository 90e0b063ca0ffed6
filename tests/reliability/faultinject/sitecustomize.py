"""Deterministic fault points for the reliability tests (loaded only by their subprocesses).

The reliability tests put this directory on PYTHONPATH, so Python imports this module at start-up
and the command under test is still plain ``python -m mlsteps ...``. Without ``MLSTEPS_FAULT_AT``
in the environment it does nothing.

``MLSTEPS_FAULT_AT=REGEX[@N]`` wraps ``os.replace``/``os.rename`` (every atomic write of mlsteps,
the COMPLETE marker of checkpoints, final/ and the report go through them): the N-th call
(default 1) whose destination matches REGEX pauses *before* the rename happens, after creating
the file named by ``MLSTEPS_FAULT_FLAG``. The test then kills the process (a kill at an exact,
reproducible moment: no sleeps, no races) or, when ``MLSTEPS_FAULT_CONTINUE`` names a file, sends
a signal and creates that file to let the process go on.

``MLSTEPS_FAULT_TRACE=FILE`` appends the destination of every rename to FILE (one per line): the
slow sweep picks its seeded kill moments from such a trace.
"""

from __future__ import annotations

import os
import re
import time

_SPEC = os.environ.get("MLSTEPS_FAULT_AT")
_TRACE = os.environ.get("MLSTEPS_FAULT_TRACE")

if _TRACE:
    _trace_replace, _trace_rename = os.replace, os.rename

    def _log(dst: object) -> None:
        with open(_TRACE, "a", encoding="utf-8") as fh:
            fh.write(os.fsdecode(os.fspath(dst)) + "\n")  # type: ignore[arg-type]

    def _replace_traced(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _log(dst)
        return _trace_replace(src, dst, *args, **kwargs)

    def _rename_traced(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _log(dst)
        return _trace_rename(src, dst, *args, **kwargs)

    os.replace = _replace_traced
    os.rename = _rename_traced

if _SPEC:
    _pattern, _, _nth = _SPEC.rpartition("@") if "@" in _SPEC else (_SPEC, "", "1")
    _regex = re.compile(_pattern)
    _target = int(_nth)
    _flag = os.environ["MLSTEPS_FAULT_FLAG"]
    _continue = os.environ.get("MLSTEPS_FAULT_CONTINUE")
    _seen = [0]
    _real_replace, _real_rename = os.replace, os.rename

    def _maybe_pause(dst: object) -> None:
        if not _regex.search(os.fsdecode(os.fspath(dst))):  # type: ignore[arg-type]
            return
        _seen[0] += 1
        if _seen[0] != _target:
            return
        with open(_flag + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()} {os.fspath(dst)}\n")  # type: ignore[arg-type]
        _real_replace(_flag + ".tmp", _flag)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if _continue and os.path.exists(_continue):
                return
            time.sleep(0.01)

    def _replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _maybe_pause(dst)
        return _real_replace(src, dst, *args, **kwargs)

    def _rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _maybe_pause(dst)
        return _real_rename(src, dst, *args, **kwargs)

    os.replace = _replace
    os.rename = _rename

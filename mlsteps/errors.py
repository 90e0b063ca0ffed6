"""Error types that map onto the CLI's exit codes.

- ``UserError``       -> exit 2: bad usage, invalid recipe, unusable input. One line, no traceback.
- ``StageFailed``     -> exit 1: a stage broke while running (NaN loss, runtime fault).
- ``StageInterrupted``-> exit 130: SIGINT/SIGTERM after a resumable checkpoint was written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class MlstepsError(Exception):
    """Base of all errors the CLI turns into a clean message."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.message.rstrip("."))
        if self.hint:
            parts.append(f" ({self.hint})")
        # Always one line: the CLI contract is one clear message per error.
        return " ".join("".join(parts).split("\n"))


class UserError(MlstepsError):
    """Invalid recipe, bad usage or unusable input data: exit code 2."""

    exit_code = EXIT_USAGE


class StageFailed(MlstepsError):
    """A stage failed at run time (NaN, numerical fault, crash): exit code 1."""

    exit_code = EXIT_STAGE_FAILED


class StageInterrupted(MlstepsError):
    """The stage stopped on SIGINT/SIGTERM after writing a resumable checkpoint: exit 130."""

    exit_code = EXIT_INTERRUPTED


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return 'did you mean X?' for the closest choice, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None


def first_line(exc: BaseException) -> str:
    """First line of an exception's message (its type name when the message is empty): library
    errors are often pages long, and user errors are one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

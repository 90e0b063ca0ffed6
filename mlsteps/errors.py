"""Error types that map onto the CLI's exit codes, and where an error says it happened.

- ``UserError``       -> exit 2: bad usage, invalid recipe, unusable input. One line, no traceback.
- ``StageFailed``     -> exit 1: a stage broke while running (NaN loss, runtime fault).
- ``StageInterrupted``-> exit 130: SIGINT/SIGTERM after a resumable checkpoint was written.

Locations come in two sorts, told apart by the constructor keyword that sets them:

- ``where=`` is an absolute location: ``recipe.yaml:12 (stages.ft.lr)``, ``data/train.jsonl:3``,
  a file path, ``override 'x=1'``. Only code that knows the whole location passes one, and
  nothing ever rewrites it.
- ``field=`` is a field path relative to the code that raises: ``"data"``, ``"models.1"``, or
  ``HERE`` (the empty path: the error is about the field the code was called for). Each
  ``field_scope(name)`` the error escapes puts ``name.`` in front, so a metric raises with
  ``field=HERE``, the eval stage calls it inside ``field_scope("metrics")`` and the stage boundary
  (``context.stage_entry``) adds ``stages.<name>`` once: ``stages.ev.metrics``.

An error raised with neither has no location, and scopes leave it so (a NaN loss has no field).
``err.where`` is the location the message shows: the absolute one, else the field path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Final

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# The empty relative path: "this error is about the field my caller scoped me to".
HERE: Final = ""


class MlstepsError(Exception):
    """Base of all errors the CLI turns into a clean message."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.location = where  # absolute: never prefixed
        self.field = field  # relative: prefixed by each field_scope it escapes
        self.hint = hint

    @property
    def where(self) -> str | None:
        """The location the message shows: the absolute one, else the field path (if any)."""
        return self.location or self.field or None

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.message.rstrip("."))
        if self.hint:
            parts.append(f" ({self.hint})")
        # Always one line: the CLI contract is one clear message per error.
        return " ".join("".join(parts).split("\n"))


@contextmanager
def field_scope(name: str) -> Iterator[None]:
    """Errors escaping this block are about the field ``name``: a relative field path gets
    ``name.`` in front (``HERE`` becomes ``name``). Absolute locations and errors without a
    location pass unchanged. Scopes nest: the outermost one ends up first in the path."""
    try:
        yield
    except MlstepsError as exc:
        if exc.location is None and exc.field is not None:
            exc.field = f"{name}.{exc.field}" if exc.field else name
        raise


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

"""What the runner hands a stage: its paths, its resolved references, its stop signal.

Stages never build paths themselves; they take them from the context so that the run-directory
layout lives in one place.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlsteps.errors import field_scope

SpecT = TypeVar("SpecT")


@dataclass
class StageResult:
    """What a stage returns: its metrics (go to metrics.json) and named output paths."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class StageContext:
    """Paths and services for one stage run."""

    run_dir: Path
    stage: str
    kind: str
    seed: int
    # Final directories of earlier stages in this run, by stage name.
    upstream: dict[str, Path] = field(default_factory=dict)
    # Set by the runner on SIGINT/SIGTERM; training loops check it at step boundaries,
    # write a resumable checkpoint and raise StageInterrupted.
    stop_event: threading.Event = field(default_factory=threading.Event)
    quiet: bool = False
    # Where the stage writes, when not in run_dir/<stage>: a changed stage that has results is
    # built aside (run_dir/.<stage>.next) and swapped in only once complete, so a failed re-run
    # never costs the last good results. It is a sibling of run_dir/<stage> (same depth), so
    # relative paths to other stages written into its files stay valid after the swap.
    build_dir: Path | None = None

    @property
    def stage_dir(self) -> Path:
        return self.build_dir if self.build_dir is not None else self.run_dir / self.stage

    @property
    def final_dir(self) -> Path:
        """Loadable model + tokenizer (or adapter) written at the end of the stage."""
        return self.stage_dir / "final"

    @property
    def checkpoints_dir(self) -> Path:
        """Resumable training checkpoints (only complete ones are resumed from)."""
        return self.stage_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        """One JSON object per logged step."""
        return self.stage_dir / "metrics.jsonl"

    @property
    def predictions_path(self) -> Path:
        return self.stage_dir / "predictions.jsonl"

    @property
    def cache_dir(self) -> Path:
        """Run-level cache (tokenised datasets); safe to delete."""
        return self.run_dir / ".cache"

    def resolve_source(self, ref: str) -> str:
        """Map a model/tokenizer reference to something `from_pretrained` accepts.

        An earlier stage name becomes its final/ directory, an existing local directory its
        absolute path; anything else is passed through as a hub id. Paths are absolute because
        they get recorded (an adapter's base model): a relative one only works from one cwd.
        """
        if ref in self.upstream:
            return str(self.upstream[ref].absolute())
        path = Path(ref).expanduser()
        if path.is_dir():
            return str(path.resolve())
        from mlsteps.hub import check_hub_id

        # A hub id: an unreachable hub fails here in seconds, not after a minute of retries.
        check_hub_id(ref)  # its error is at the stage itself: stage_entry names it
        return ref

    def is_stage_ref(self, ref: str) -> bool:
        return ref in self.upstream

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def log(self, message: str) -> None:
        """Progress line for humans; goes to stderr so --json stdout stays clean."""
        if not self.quiet:
            print(f"[{self.stage}] {message}", file=sys.stderr, flush=True)


def stage_entry(
    run: Callable[[SpecT, StageContext], StageResult],
) -> Callable[[SpecT, StageContext], StageResult]:
    """The stage boundary: a stage kind's ``run``. Field errors raised inside it are relative to
    the stage's recipe entry, and get ``stages.<name>`` in front here, once (errors.py)."""

    @functools.wraps(run)
    def entry(spec: SpecT, ctx: StageContext) -> StageResult:
        with field_scope(f"stages.{ctx.stage}"):
            return run(spec, ctx)

    return entry

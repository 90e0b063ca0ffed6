"""The stage runner: order, fingerprint, skip or resume, lock, state.json, dispatch, signals."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mlsteps import __version__, distributed, stagedirs
from mlsteps.errors import StageInterrupted, UserError, did_you_mean
from mlsteps.executor import RunResult, StageRunner
from mlsteps.fingerprint import recipe_fingerprints
from mlsteps.recipe import Recipe, check_data_files
from mlsteps.recipe.specs.loading import check_devices
from mlsteps.run_plan import Recorded, plan_run
from mlsteps.rundir import RunLock, check_run_dir, read_json, read_state
from mlsteps.runstate import open_run_dir


def rank() -> int:
    """Global rank under torchrun/accelerate (0 when not distributed)."""
    from mlsteps.distributed import rank as global_rank

    return global_rank()


class _Signals:
    """First SIGINT/SIGTERM asks the running stage to stop at a safe point; a second one aborts."""

    def __init__(self, stop_event: threading.Event):
        self.stop_event = stop_event
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_event.is_set():
            raise KeyboardInterrupt(name)
        self.received = name
        self.stop_event.set()
        print(
            f"\n{name} received: stopping at the next safe point (again to abort)", file=sys.stderr
        )

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _select(recipe: Recipe, from_stage: str | None, only: str | None) -> None:
    for flag, name in (("--from", from_stage), ("--only", only)):
        if name is not None and name not in recipe.stages:
            hint = did_you_mean(name, recipe.stages) or f"stages: {', '.join(recipe.stages)}"
            raise UserError(f"{flag}: no stage named '{name}'", hint=hint)
    if from_stage and only:
        raise UserError("--from and --only cannot be combined", hint="pick one")


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write the run directory: {exc.strerror}",
            where=str(run_dir),
            hint="pick a writable --run-dir",
        ) from None


def run_recipe(
    recipe: Recipe,
    run_dir: Path,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run (or resume) a recipe in run_dir. Raises MlstepsError subclasses for the CLI."""
    _select(recipe, from_stage, only)
    check_data_files(recipe)
    check_devices(recipe)  # a CUDA-only setting on a machine without CUDA: exit 2, nothing written
    main = rank() == 0
    quiet = quiet or not main  # rank 0 speaks for the run
    distributed.configure(recipe.distributed)
    distributed.init_process_group()  # no-op (and no torch import) in a single process
    lock = RunLock(run_dir)

    def prepare_and_lock() -> None:
        # Refuse a directory that is not ours before writing anything into it (not even .lock).
        check_run_dir(run_dir, recipe.name, force=force)
        _prepare_run_dir(run_dir)
        lock.acquire()

    # Only rank 0 prepares and locks; a refusal is raised on every rank (same exit code).
    distributed.run_on_main(prepare_and_lock)
    try:
        return _run_locked(recipe, run_dir, from_stage, only, force, quiet, main)
    finally:
        lock.release()


def _run_locked(
    recipe: Recipe,
    run_dir: Path,
    from_stage: str | None,
    only: str | None,
    force: bool,
    quiet: bool,
    main: bool,
) -> RunResult:
    if main:
        state, metrics = open_run_dir(recipe, run_dir, force)
    # Every rank reads the same state.json after rank 0 has repaired it, before it writes more.
    distributed.barrier()
    if not main:
        state = read_state(run_dir) or {"stages": {}}
        metrics = read_json(run_dir / "metrics.json", {}) or {}
    state.update({"name": recipe.name, "mlsteps": __version__})
    # Rank 0 sees the files and decides; every rank plans from its facts and follows the plan.
    facts = (
        (recipe_fingerprints(recipe), _recorded(run_dir, recipe, state, metrics)) if main else None
    )
    fingerprints, recorded = distributed.broadcast_object(facts) or ({}, {})
    steps = plan_run(recipe, fingerprints, recorded, force=force, from_stage=from_stage, only=only)
    run = StageRunner(recipe, run_dir, state, metrics, quiet=quiet, main=main)
    with _Signals(run.stop_event) as signals:
        for step in steps:
            if step.action == "refuse":
                raise UserError(
                    step.reason,
                    where=str(run_dir / step.name),
                    hint="move it out of the run directory, or pass another --run-dir",
                )
            if step.action == "skip":
                run.skip(step)
            elif step.action == "run":
                if signals.received:
                    raise StageInterrupted(
                        f"interrupted by {signals.received} before stage '{step.name}'",
                        hint="run the same command again to continue",
                    )
                run.execute(step)
        if signals.received:
            raise StageInterrupted(
                f"interrupted by {signals.received}", hint="run the same command again to continue"
            )
        run.finish()
    return run.result


def _recorded(
    run_dir: Path, recipe: Recipe, state: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Recorded]:
    """What the run directory says about each stage of the recipe (the plan's facts)."""
    out = {}
    for name in recipe.stages:
        entry = state["stages"].get(name, {})
        outputs_exist = stagedirs.outputs_exist(run_dir, entry)
        # An aside build is only ever made beside complete results: read its mark only then.
        has_results = entry.get("status") == "done" and outputs_exist
        out[name] = Recorded(
            entry=entry,
            has_metrics=name in metrics,
            outputs_exist=outputs_exist,
            attempt_fingerprint=stagedirs.attempt_fingerprint(run_dir, name)
            if has_results
            else None,
            dir_exists=(run_dir / name).exists(),
        )
    return out

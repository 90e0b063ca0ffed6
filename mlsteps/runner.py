"""The stage runner: order, fingerprint, skip or resume, lock, state.json, dispatch, signals."""

from __future__ import annotations

import importlib
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlsteps import __version__, distributed, stagedirs
from mlsteps.context import StageContext, StageResult
from mlsteps.errors import (
    MlstepsError,
    StageFailed,
    StageInterrupted,
    UserError,
    did_you_mean,
)
from mlsteps.fingerprint import fingerprint, stage_refs
from mlsteps.recipe import Recipe, check_data_files
from mlsteps.rundir import (
    RunLock,
    atomic_write_json,
    check_run_dir,
    environment_info,
    finite_json,
    read_json,
    read_state,
)
from mlsteps.runstate import open_run_dir, recipe_changed, report_stale, write_recipe
from mlsteps.specs.loading import check_devices
from mlsteps.stage_failures import error_text, record_failure, stage_failure


def rank() -> int:
    """Global rank under torchrun/accelerate (0 when not distributed)."""
    from mlsteps.distributed import rank as global_rank

    return global_rank()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "exit_code": self.exit_code, "stages": self.stages}


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
    from mlsteps import report

    state_path, metrics_path = run_dir / "state.json", run_dir / "metrics.json"
    if main:
        state, metrics = open_run_dir(recipe, run_dir, force)
    # Every rank reads the same state.json after rank 0 has repaired it, before it writes more.
    distributed.barrier()
    if not main:
        state = read_state(run_dir) or {"stages": {}}
        metrics = read_json(metrics_path, {}) or {}
    state.update({"name": recipe.name, "mlsteps": __version__})

    names = list(recipe.stages)
    forced: set[str] = set()
    if force:
        forced = set(names)
    elif from_stage:
        forced = set(names[names.index(from_stage) :])
    elif only:
        forced = {only}
    fingerprints: dict[str, str] = {}
    rerun: set[str] = set()
    result = RunResult(run_dir=run_dir)
    stop_event = threading.Event()

    def save_state() -> None:
        # state.json first: in a new directory it is the write that makes the directory ours.
        if main:
            atomic_write_json(state_path, state)
            write_recipe(run_dir, recipe)
            if not (run_dir / "env.json").exists():
                atomic_write_json(run_dir / "env.json", environment_info())

    with _Signals(stop_event) as signals:
        for name, spec in recipe.stages.items():
            refs = [r for r in stage_refs(spec) if r in recipe.stages]
            fp = fingerprint(spec, recipe.seed, {r: fingerprints[r] for r in refs})
            fingerprints[name] = fp
            prev = state["stages"].get(name, {})
            up_to_date = (
                prev.get("status") == "done" and prev.get("fingerprint") == fp and name in metrics
            )
            if only and name != only:
                # Stages outside --only are neither run nor touched; upstream must exist.
                if name in [r for r in stage_refs(recipe.stages[only])] and not up_to_date:
                    raise UserError(
                        f"--only {only} needs stage '{name}' to be done first",
                        hint=f"run it first: mlsteps run RECIPE --only {name}",
                    )
                continue
            if main and not prev and (run_dir / name).exists():
                raise UserError(
                    f"'{name}' in the run directory was not made by mlsteps (state.json does not "
                    f"record it), and stage '{name}' would write there",
                    where=str(run_dir / name),
                    hint="move it out of the run directory, or pass another --run-dir",
                )
            dependent = any(r in rerun for r in refs)
            has_results = prev.get("status") == "done" and stagedirs.outputs_exist(run_dir, prev)
            fresh = prev.get("fingerprint") != fp or name in forced or dependent
            aside = has_results and fresh  # results to keep until the new ones are complete
            # An interrupted aside build of this very config resumes (unless forced anew).
            resume_aside = (
                aside
                and name not in forced
                and not dependent
                and stagedirs.attempt_fingerprint(run_dir, name) == fp
            )
            # Rank 0 decides skip/resume/where (it sees the files); every rank follows it.
            skip, fresh, aside, resume_aside = distributed.broadcast_object(
                (
                    up_to_date and name not in forced and not dependent and has_results,
                    fresh,
                    aside,
                    resume_aside,
                )
            )
            if skip:
                if main:
                    stagedirs.remove_build(run_dir, name)  # an abandoned build of another config
                result.stages[name] = {"status": "done", "skipped": True, **_timing(prev)}
                if not quiet:
                    print(f"[{name}] up to date, skipped", file=sys.stderr)
                continue
            if signals.received:
                raise StageInterrupted(
                    f"interrupted by {signals.received} before stage '{name}'",
                    hint="run the same command again to continue",
                )
            started = _now()
            if aside:
                stage_dir = stagedirs.next_dir(run_dir, name)
                if main and not resume_aside:
                    stagedirs.start_build(run_dir, name, fp, started)
                if not quiet:
                    print(
                        f"[{name}] changed: built in {stage_dir.name}/; the results in {name}/ "
                        "are kept until it is complete",
                        file=sys.stderr,
                    )
            else:
                stage_dir = run_dir / name
                if main:
                    stagedirs.remove_build(run_dir, name)
                    if fresh and stage_dir.exists():
                        # A different config must never resume from the old config's checkpoints.
                        shutil.rmtree(stage_dir)
                    (stage_dir / stagedirs.RECORD).unlink(missing_ok=True)
                state["stages"][name] = {
                    "kind": spec.kind,
                    "status": "running",
                    "fingerprint": fp,
                    "started_at": started,
                    "resumed": not fresh,
                }
                metrics.pop(name, None)
                save_state()
            distributed.barrier()  # nobody writes into the stage dir before it is ready
            stage_dir.mkdir(parents=True, exist_ok=True)
            rerun.add(name)
            ctx = StageContext(
                run_dir=run_dir,
                stage=name,
                kind=spec.kind,
                seed=recipe.seed,
                upstream={r: run_dir / r / "final" for r in names[: names.index(name)]},
                stop_event=stop_event,
                quiet=quiet,
                build_dir=stage_dir if aside else None,
            )
            t0 = time.monotonic()
            try:
                stage_result = _dispatch(spec, ctx)
            except BaseException as exc:
                failure = stage_failure(exc, name, stage_dir, run_dir)
                if aside:
                    if main:
                        stagedirs.mark_attempt(
                            stage_dir,
                            status="failed",
                            error=error_text(failure),
                            interrupted=isinstance(failure, StageInterrupted),
                        )
                    if not quiet:
                        what = "stopped" if isinstance(failure, StageInterrupted) else "failed"
                        print(
                            f"[{name}] {what}; the previous results in {name}/, state.json and "
                            f"report.md are unchanged (this attempt: {stage_dir.name}/)",
                            file=sys.stderr,
                        )
                else:
                    entry = state["stages"][name]
                    entry.update(
                        status="failed",
                        finished_at=_now(),
                        duration_s=round(time.monotonic() - t0, 3),
                        error=error_text(failure),
                    )
                    if isinstance(failure, StageInterrupted):
                        entry["interrupted"] = True
                    elif not isinstance(exc, MlstepsError | KeyboardInterrupt):
                        entry["traceback"] = traceback.format_exc()
                    record_failure(save_state, lambda: _safe_report(run_dir, report, main))
                if failure is exc:
                    raise
                raise failure from exc
            problems: list[str] = []
            stage_metrics = finite_json(stage_result.metrics, problems)
            for problem in problems:
                print(
                    f"warning: [{name}] metric {problem} is not a finite number; recorded as null "
                    "with the reason next to it",
                    file=sys.stderr,
                )
            entry = {
                "kind": spec.kind,
                "status": "done",
                "fingerprint": fp,
                "started_at": started,
                "resumed": not fresh or resume_aside,
                "finished_at": _now(),
                "duration_s": round(time.monotonic() - t0, 3),
                "outputs": stagedirs.relative_outputs(
                    run_dir, stage_dir, name, stage_result.outputs
                ),
            }
            if main:
                # The stage's own record first: from it a lost state or metrics.json is rebuilt.
                stagedirs.write_record(
                    stage_dir, {"stage": name, **entry, "metrics": stage_metrics}
                )
                if aside:
                    stagedirs.swap_in(run_dir, name)
            state["stages"][name] = entry
            metrics[name] = stage_metrics
            if main:
                atomic_write_json(metrics_path, metrics)
                atomic_write_json(run_dir / "env.json", environment_info())
            save_state()
            if main and aside:
                stagedirs.drop_old(run_dir, name)
            _safe_report(run_dir, report, main)
            distributed.barrier()  # the next stage may read this one's outputs
            result.stages[name] = {
                "status": "done",
                "skipped": False,
                **_timing(entry),
                "metrics": stage_metrics,
            }
        if signals.received:
            raise StageInterrupted(
                f"interrupted by {signals.received}", hint="run the same command again to continue"
            )
        if main and not rerun and recipe_changed(run_dir, recipe):
            save_state()  # e.g. a stage removed from the recipe: the report must follow
        if not rerun and report_stale(run_dir):
            # Nothing ran, but the last report write was lost (killed mid-write, deleted).
            _safe_report(run_dir, report, main)
    return result


def _timing(entry: dict[str, Any]) -> dict[str, Any]:
    return {"duration_s": entry.get("duration_s")}


def _dispatch(spec: Any, ctx: StageContext) -> StageResult:
    try:
        module = importlib.import_module(f"mlsteps.stages.{spec.kind}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mlsteps.stages.{spec.kind}":
            raise StageFailed(f"stage kind '{spec.kind}' is not available in this build") from None
        raise
    result = module.run(spec, ctx)
    if not isinstance(result, StageResult):
        raise StageFailed(
            f"stage kind '{spec.kind}' returned {type(result).__name__}, not StageResult"
        )
    return result


def _safe_report(run_dir: Path, report: Any, main: bool) -> None:
    """Regenerate report.md; a broken report never fails a run."""
    if not main:
        return
    try:
        report.write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience, results are safe
        print(f"warning: could not write report.md: {exc}", file=sys.stderr)

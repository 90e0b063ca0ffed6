"""Carries out a run plan's steps (mlsteps.run_plan): the stage's folder made ready, the stage
dispatched, its result or failure recorded in the stage folder, state.json, metrics.json and the
report, in the order that keeps earlier results safe."""

from __future__ import annotations

import importlib
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlsteps import distributed, stagedirs
from mlsteps.context import StageContext, StageResult
from mlsteps.errors import MlstepsError, StageFailed, StageInterrupted
from mlsteps.recipe import Recipe
from mlsteps.run_plan import StagePlan
from mlsteps.rundir import atomic_write_json, environment_info, finite_json
from mlsteps.runstate import recipe_changed, report_stale, write_recipe
from mlsteps.stage_failures import error_text, record_failure, stage_failure


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "exit_code": self.exit_code, "stages": self.stages}


class StageRunner:
    """Carries out a plan's steps: stage folders, state.json, metrics.json and the report."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        state: dict[str, Any],
        metrics: dict[str, Any],
        *,
        quiet: bool,
        main: bool,
    ):
        from mlsteps import report

        self.recipe, self.run_dir, self.state, self.metrics = recipe, run_dir, state, metrics
        self.quiet, self.main, self.report = quiet, main, report
        self.stop_event = threading.Event()
        self.result = RunResult(run_dir=run_dir)
        self.ran: list[str] = []

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def save_state(self) -> None:
        # state.json first: in a new directory it is the write that makes the directory ours.
        if self.main:
            atomic_write_json(self.run_dir / "state.json", self.state)
            write_recipe(self.run_dir, self.recipe)
            if not (self.run_dir / "env.json").exists():
                atomic_write_json(self.run_dir / "env.json", environment_info())

    def write_report(self) -> None:
        _safe_report(self.run_dir, self.report, self.main)

    def skip(self, step: StagePlan) -> None:
        if self.main:
            stagedirs.remove_build(self.run_dir, step.name)  # an abandoned build of another config
        prev = self.state["stages"].get(step.name, {})
        self.result.stages[step.name] = {"status": "done", "skipped": True, **_timing(prev)}
        self.say(f"[{step.name}] {step.reason}")

    def prepare(self, step: StagePlan, spec: Any, started: str) -> Path:
        """The folder the stage writes into, made ready; state.json says it is running."""
        name, run_dir = step.name, self.run_dir
        if step.aside:
            stage_dir = stagedirs.next_dir(run_dir, name)
            if self.main and not step.resume_aside:
                stagedirs.start_build(run_dir, name, step.fingerprint, started)
            self.say(
                f"[{name}] changed: built in {stage_dir.name}/; the results in {name}/ "
                "are kept until it is complete"
            )
            return stage_dir
        stage_dir = run_dir / name
        if step.reason.startswith(("re-runs", "resumes")):
            self.say(f"[{name}] {step.reason}")
        if self.main:
            stagedirs.remove_build(run_dir, name)
            if step.fresh and stage_dir.exists():
                # A different config must never resume from the old config's checkpoints.
                shutil.rmtree(stage_dir)
            (stage_dir / stagedirs.RECORD).unlink(missing_ok=True)
        self.state["stages"][name] = {
            "kind": spec.kind,
            "status": "running",
            "fingerprint": step.fingerprint,
            "started_at": started,
            "resumed": not step.fresh,
        }
        self.metrics.pop(name, None)
        self.save_state()
        return stage_dir

    def execute(self, step: StagePlan) -> None:
        name, run_dir, recipe = step.name, self.run_dir, self.recipe
        spec = recipe.stages[name]
        started = _now()
        stage_dir = self.prepare(step, spec, started)
        distributed.barrier()  # nobody writes into the stage dir before it is ready
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.ran.append(name)
        names = list(recipe.stages)
        ctx = StageContext(
            run_dir=run_dir,
            stage=name,
            kind=spec.kind,
            seed=recipe.seed,
            upstream={r: run_dir / r / "final" for r in names[: names.index(name)]},
            stop_event=self.stop_event,
            quiet=self.quiet,
            build_dir=stage_dir if step.aside else None,
        )
        t0 = time.monotonic()
        try:
            stage_result = _dispatch(spec, ctx)
        except BaseException as exc:
            failure = stage_failure(exc, name, stage_dir, run_dir)
            self.record_failure(step, stage_dir, exc, failure, t0)
            if failure is exc:
                raise
            raise failure from exc
        self.record_success(step, spec, stage_dir, stage_result, started, t0)

    def record_failure(
        self, step: StagePlan, stage_dir: Path, exc: BaseException, failure: Any, t0: float
    ) -> None:
        name = step.name
        interrupted = isinstance(failure, StageInterrupted)
        if step.aside:
            if self.main:
                stagedirs.mark_attempt(
                    stage_dir, status="failed", error=error_text(failure), interrupted=interrupted
                )
            what = "stopped" if interrupted else "failed"
            self.say(
                f"[{name}] {what}; the previous results in {name}/, state.json and "
                f"report.md are unchanged (this attempt: {stage_dir.name}/)"
            )
            return
        entry = self.state["stages"][name]
        entry.update(
            status="failed",
            finished_at=_now(),
            duration_s=round(time.monotonic() - t0, 3),
            error=error_text(failure),
        )
        if interrupted:
            entry["interrupted"] = True
        elif not isinstance(exc, MlstepsError | KeyboardInterrupt):
            entry["traceback"] = traceback.format_exc()
        record_failure(self.save_state, self.write_report)

    def record_success(
        self,
        step: StagePlan,
        spec: Any,
        stage_dir: Path,
        stage_result: StageResult,
        started: str,
        t0: float,
    ) -> None:
        name, run_dir, main = step.name, self.run_dir, self.main
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
            "fingerprint": step.fingerprint,
            "started_at": started,
            "resumed": not step.fresh or step.resume_aside,
            "finished_at": _now(),
            "duration_s": round(time.monotonic() - t0, 3),
            "outputs": stagedirs.relative_outputs(run_dir, stage_dir, name, stage_result.outputs),
        }
        if main:
            # The stage's own record first: from it a lost state or metrics.json is rebuilt.
            stagedirs.write_record(stage_dir, {"stage": name, **entry, "metrics": stage_metrics})
            if step.aside:
                stagedirs.swap_in(run_dir, name)
        self.state["stages"][name] = entry
        self.metrics[name] = stage_metrics
        if main:
            atomic_write_json(run_dir / "metrics.json", self.metrics)
            atomic_write_json(run_dir / "env.json", environment_info())
        self.save_state()
        if main and step.aside:
            stagedirs.drop_old(run_dir, name)
        self.write_report()
        distributed.barrier()  # the next stage may read this one's outputs
        self.result.stages[name] = {
            "status": "done",
            "skipped": False,
            **_timing(entry),
            "metrics": stage_metrics,
        }

    def finish(self) -> None:
        """Nothing ran: the run-level files still follow the recipe and the report is there."""
        if self.ran:
            return
        if self.main and recipe_changed(self.run_dir, self.recipe):
            self.save_state()  # e.g. a stage removed from the recipe: the report must follow
        if report_stale(self.run_dir):
            # Nothing ran, but the last report write was lost (killed mid-write, deleted).
            self.write_report()


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

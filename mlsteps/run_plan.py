"""Which stages a run runs, skips or resumes, and why: a pure function of the recipe, what the
run directory records and the stages' fingerprints (no I/O; the runner gathers the facts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlsteps.errors import UserError
from mlsteps.fingerprint import stage_refs
from mlsteps.recipe import Recipe

Action = Literal["run", "skip", "leave", "refuse"]


@dataclass(frozen=True)
class Recorded:
    """What the run directory says about one stage (gathered by the runner, on rank 0)."""

    entry: dict[str, Any] = field(default_factory=dict)  # its state.json record ({}: none)
    has_metrics: bool = False  # metrics.json holds its metrics
    outputs_exist: bool = False  # every output its record names is still there
    attempt_fingerprint: str | None = None  # of an aside build (.<stage>.next) left behind
    dir_exists: bool = False  # run_dir/<stage> exists


@dataclass(frozen=True)
class StagePlan:
    """One stage's decision. ``run``: ``fresh`` starts anew (else resumes from its checkpoints),
    ``aside`` builds in .<stage>.next and keeps the current results until the new ones are
    complete, ``resume_aside`` continues such a build. ``leave``: outside --only, untouched.
    ``refuse``: the run stops there with ``reason`` as the error."""

    name: str
    action: Action
    reason: str
    fingerprint: str
    fresh: bool = False
    aside: bool = False
    resume_aside: bool = False


def _forced(
    names: list[str], force: bool, from_stage: str | None, only: str | None
) -> dict[str, str]:
    """Stages the command line asks to run anew, with the flag that asks."""
    if force:
        return dict.fromkeys(names, "forced by --force")
    if from_stage:
        return dict.fromkeys(names[names.index(from_stage) :], f"forced by --from {from_stage}")
    if only:
        return {only: f"forced by --only {only}"}
    return {}


def _why_run(rec: Recorded, fp: str, forced: str | None, dependent: list[str]) -> str:
    prev = rec.entry
    if forced:
        return forced
    if not prev:
        return "runs: not run before"
    if dependent:
        return f"re-runs: upstream stage '{dependent[0]}' runs"
    if prev.get("fingerprint") != fp:
        return "re-runs: its config, input data or upstream changed"
    if prev.get("status") != "done":
        return f"resumes: its last attempt is {prev.get('status')}"
    if not rec.has_metrics:
        return "re-runs: its metrics are missing from metrics.json"
    return "re-runs: outputs it recorded are missing"


def plan_run(
    recipe: Recipe,
    fingerprints: dict[str, str],
    recorded: dict[str, Recorded],
    *,
    force: bool = False,
    from_stage: str | None = None,
    only: str | None = None,
) -> list[StagePlan]:
    """The run's steps in recipe order. Raises UserError when --only lacks a done upstream."""
    names = list(recipe.stages)
    forced = _forced(names, force, from_stage, only)
    runs: set[str] = set()  # stages this run executes: their dependents must run too
    steps: list[StagePlan] = []
    for name, spec in recipe.stages.items():
        fp = fingerprints[name]
        rec = recorded.get(name, Recorded())
        prev = rec.entry
        up_to_date = (
            prev.get("status") == "done" and prev.get("fingerprint") == fp and rec.has_metrics
        )
        if only and name != only:
            # Stages outside --only are neither run nor touched; upstream must exist.
            if name in stage_refs(recipe.stages[only]) and not up_to_date:
                raise UserError(
                    f"--only {only} needs stage '{name}' to be done first",
                    hint=f"run it first: mlsteps run RECIPE --only {name}",
                )
            steps.append(StagePlan(name, "leave", f"not selected (--only {only})", fp))
            continue
        if not prev and rec.dir_exists:
            reason = (
                f"'{name}' in the run directory was not made by mlsteps (state.json does not "
                f"record it), and stage '{name}' would write there"
            )
            steps.append(StagePlan(name, "refuse", reason, fp))
            break  # the run stops here
        refs = [r for r in stage_refs(spec) if r in recipe.stages]
        dependent = [r for r in refs if r in runs]
        has_results = prev.get("status") == "done" and rec.outputs_exist
        if up_to_date and has_results and name not in forced and not dependent:
            steps.append(StagePlan(name, "skip", "up to date, skipped", fp))
            continue
        fresh = prev.get("fingerprint") != fp or name in forced or bool(dependent)
        aside = has_results and fresh  # results to keep until the new ones are complete
        # An interrupted aside build of this very config resumes (unless forced anew).
        resume_aside = (
            aside and name not in forced and not dependent and rec.attempt_fingerprint == fp
        )
        reason = _why_run(rec, fp, forced.get(name), dependent)
        if resume_aside:
            reason = "resumes its interrupted build"
        steps.append(StagePlan(name, "run", reason, fp, fresh, aside, resume_aside))
        runs.add(name)
    return steps

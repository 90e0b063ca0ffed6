"""The run plan: which stages run, skip or resume, and why, from the recipe, what the run
directory records and the fingerprints alone (no files, no torch; the runner's bookkeeping
end to end is in test_runner.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import load_recipe
from mlsteps.run_plan import Recorded, StagePlan, plan_run

RECIPE = """\
name: plan
stages:
  tok: {kind: tokenizer, from: some/tokenizer}
  pre: {kind: pretrain, from: some/model, tokenizer: tok, data: "builtin:toy/corpus"}
  other: {kind: tokenizer, from: some/other}
  ev: {kind: eval, models: [pre], data: "builtin:toy/corpus", metrics: [perplexity]}
"""
FPS = {"tok": "f-tok", "pre": "f-pre", "other": "f-other", "ev": "f-ev"}


@pytest.fixture
def recipe(write_recipe):
    return load_recipe(write_recipe(RECIPE))


def done(fp: str, **kw) -> Recorded:
    entry = {"status": "done", "fingerprint": fp, "outputs": {"final": "x/final"}}
    facts = {"has_metrics": True, "outputs_exist": True, "dir_exists": True, **kw}
    return Recorded(entry=entry, **facts)


def all_done() -> dict[str, Recorded]:
    return {name: done(fp) for name, fp in FPS.items()}


def by_name(steps: list[StagePlan]) -> dict[str, StagePlan]:
    return {s.name: s for s in steps}


def test_a_new_run_directory_runs_every_stage_fresh_in_place(recipe):
    steps = plan_run(recipe, FPS, {})
    assert [s.name for s in steps] == ["tok", "pre", "other", "ev"]
    for step in steps:
        assert (step.action, step.fresh, step.aside) == ("run", True, False)
        assert step.reason == "runs: not run before"
        assert step.fingerprint == FPS[step.name]


def test_everything_up_to_date_is_skipped(recipe):
    steps = plan_run(recipe, FPS, all_done())
    assert {s.action for s in steps} == {"skip"}
    assert steps[0].reason == "up to date, skipped"


def test_a_change_reruns_the_stage_aside_and_its_dependents_only(recipe):
    steps = by_name(plan_run(recipe, {**FPS, "pre": "f-pre-2"}, all_done()))
    assert steps["tok"].action == steps["other"].action == "skip"
    pre, ev = steps["pre"], steps["ev"]
    assert (pre.action, pre.fresh, pre.aside, pre.resume_aside) == ("run", True, True, False)
    assert pre.reason == "re-runs: its config, input data or upstream changed"
    assert pre.fingerprint == "f-pre-2"
    # ev's own fingerprint is unchanged here, but it reads pre's model, which is re-made.
    assert (ev.action, ev.fresh, ev.aside) == ("run", True, True)
    assert ev.reason == "re-runs: upstream stage 'pre' runs"


def test_an_interrupted_stage_resumes_in_place(recipe):
    recorded = all_done()
    recorded["pre"] = Recorded(entry={"status": "running", "fingerprint": "f-pre"}, dir_exists=True)
    steps = by_name(plan_run(recipe, FPS, recorded))
    pre = steps["pre"]
    assert (pre.action, pre.fresh, pre.aside) == ("run", False, False)
    assert pre.reason == "resumes: its last attempt is running"
    assert steps["ev"].action == "run" and steps["ev"].fresh  # downstream of a re-made model


def test_an_interrupted_aside_build_of_the_same_config_resumes_unless_forced(recipe):
    recorded = all_done()
    recorded["pre"] = done("f-pre", attempt_fingerprint="f-pre-2")
    pre = by_name(plan_run(recipe, {**FPS, "pre": "f-pre-2"}, recorded))["pre"]
    assert (pre.action, pre.fresh, pre.aside, pre.resume_aside) == ("run", True, True, True)
    assert pre.reason == "resumes its interrupted build"
    # An aside build of another config does not resume; --force starts anew.
    recorded["pre"] = done("f-pre", attempt_fingerprint="f-pre-3")
    assert not by_name(plan_run(recipe, {**FPS, "pre": "f-pre-2"}, recorded))["pre"].resume_aside
    recorded["pre"] = done("f-pre", attempt_fingerprint="f-pre-2")
    forced = by_name(plan_run(recipe, {**FPS, "pre": "f-pre-2"}, recorded, force=True))["pre"]
    assert (forced.aside, forced.resume_aside, forced.reason) == (True, False, "forced by --force")


def test_missing_outputs_or_metrics_rerun_in_place_without_discarding_checkpoints(recipe):
    recorded = all_done()
    recorded["tok"] = done("f-tok", outputs_exist=False)
    recorded["other"] = done("f-other", has_metrics=False)
    steps = by_name(plan_run(recipe, FPS, recorded))
    tok, other = steps["tok"], steps["other"]
    assert (tok.action, tok.fresh, tok.aside) == ("run", False, False)
    assert tok.reason == "re-runs: outputs it recorded are missing"
    # Results still on disk are kept aside only when the stage starts anew; this one resumes.
    assert (other.action, other.fresh, other.aside) == ("run", False, False)
    assert other.reason == "re-runs: its metrics are missing from metrics.json"
    assert steps["pre"].reason == "re-runs: upstream stage 'tok' runs"


def test_from_forces_that_stage_and_the_rest(recipe):
    steps = plan_run(recipe, FPS, all_done(), from_stage="other")
    assert [s.action for s in steps] == ["skip", "skip", "run", "run"]
    assert steps[2].reason == steps[3].reason == "forced by --from other"
    assert steps[2].aside and steps[2].fresh


def test_only_leaves_the_others_untouched_and_needs_its_upstream_done(recipe):
    steps = plan_run(recipe, FPS, all_done(), only="ev")
    assert [s.action for s in steps] == ["leave", "leave", "leave", "run"]
    assert steps[0].reason == "not selected (--only ev)"
    assert steps[3].reason == "forced by --only ev"
    recorded = all_done()
    recorded["pre"] = done("f-pre-old")  # done, but for another config
    with pytest.raises(UserError, match="--only ev needs stage 'pre' to be done first"):
        plan_run(recipe, FPS, recorded, only="ev")
    # A stage ev does not read may be in any state.
    recorded = all_done()
    recorded["other"] = Recorded()
    assert plan_run(recipe, FPS, recorded, only="ev")[3].action == "run"


def test_a_folder_state_json_does_not_record_stops_the_run_at_that_stage(recipe):
    recorded = {"tok": done("f-tok"), "pre": Recorded(dir_exists=True)}
    steps = plan_run(recipe, FPS, recorded)
    assert [s.action for s in steps] == ["skip", "refuse"]
    assert "'pre' in the run directory was not made by mlsteps" in steps[1].reason


def test_the_plan_does_not_import_torch():
    code = "import sys, mlsteps.run_plan; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

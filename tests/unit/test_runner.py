"""Runner bookkeeping with a fake stage: skip, re-run downstream, --from/--only, lock, failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlsteps.errors import StageFailed, UserError
from mlsteps.recipe import load_recipe
from mlsteps.rundir import RunLock
from mlsteps.runner import run_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fake_stages  # noqa: E402

RECIPE = """\
name: fake
stages:
  tok: {kind: tokenizer, from: some/tokenizer}
  pre: {kind: pretrain, from: some/model, tokenizer: tok, data: "builtin:toy/corpus"}
  other: {kind: tokenizer, from: some/other}
  ev: {kind: eval, models: [pre], data: "builtin:toy/corpus", metrics: [perplexity]}
"""


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    for kind in ("tokenizer", "pretrain", "finetune", "prompt", "eval", "predict"):
        monkeypatch.setitem(sys.modules, f"mlsteps.stages.{kind}", fake_stages)
    fake_stages.CALLS.clear()
    fake_stages.BEHAVIOUR.clear()
    yield


def go(write_recipe, run_dir, overrides=(), **kw):
    recipe = load_recipe(write_recipe(RECIPE), list(overrides))
    fake_stages.CALLS.clear()
    run_recipe(recipe, run_dir, quiet=True, **kw)
    return list(fake_stages.CALLS)


def test_first_run_writes_the_run_directory(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    assert go(write_recipe, run_dir) == ["tok", "pre", "other", "ev"]
    for name in ("recipe.yaml", "state.json", "metrics.json", "report.md", "env.json"):
        assert (run_dir / name).is_file(), name
    state = json.loads((run_dir / "state.json").read_text())
    assert {s["status"] for s in state["stages"].values()} == {"done"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pre"] == {"resumed_from": 0, "loss": 1.5}
    info = json.loads((run_dir / "pre" / "final" / "info.json").read_text())
    assert info["upstream"]["tok"] == str(run_dir / "tok" / "final")
    assert "## pre" in (run_dir / "report.md").read_text()
    assert not list(run_dir.glob("**/*.tmp"))


def test_rerun_skips_and_change_reruns_downstream_only(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    go(write_recipe, run_dir)
    assert go(write_recipe, run_dir) == []
    # Changing 'pre' re-runs it and 'ev' (which uses it), not 'tok' or the independent 'other'.
    assert go(write_recipe, run_dir, ["stages.pre.train.lr=0.1"]) == ["pre", "ev"]
    # Changing 'tok' re-runs everything that depends on it, transitively.
    assert go(
        write_recipe, run_dir, ["stages.pre.train.lr=0.1", "stages.tok.from=some/tokenizer-2"]
    ) == [
        "tok",
        "pre",
        "ev",
    ]


def test_data_file_change_reruns(write_recipe, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    run_dir = tmp_path / "run"
    ov = [f"stages.pre.data={data}"]
    go(write_recipe, run_dir, ov)
    assert go(write_recipe, run_dir, ov) == []
    time.sleep(0.01)
    data.write_text("hello world\n")
    assert go(write_recipe, run_dir, ov) == ["pre", "ev"]


def test_from_only_force(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    go(write_recipe, run_dir)
    assert go(write_recipe, run_dir, from_stage="pre") == ["pre", "other", "ev"]
    assert go(write_recipe, run_dir, only="other") == ["other"]
    assert go(write_recipe, run_dir, force=True) == ["tok", "pre", "other", "ev"]
    with pytest.raises(UserError, match="no stage named 'pree'.*did you mean 'pre'"):
        go(write_recipe, run_dir, from_stage="pree")


def test_only_needs_upstream_done(write_recipe, tmp_path):
    with pytest.raises(UserError, match="--only ev needs stage 'pre' to be done first"):
        go(write_recipe, tmp_path / "run", only="ev")


def test_failure_keeps_earlier_results(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    go(write_recipe, run_dir)
    before = (run_dir / "tok" / "final" / "info.json").read_text()
    fake_stages.BEHAVIOUR["pre"] = "fail"
    with pytest.raises(StageFailed, match="stage 'pre' failed: RuntimeError: boom"):
        go(write_recipe, run_dir, ["stages.pre.train.lr=0.2"])
    # 'pre' had results: the failed re-run was built aside and leaves them (and its state) alone.
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["pre"]["status"] == "done"
    attempt = json.loads((run_dir / ".pre.next" / "attempt.json").read_text())
    assert attempt["status"] == "failed" and "boom" in attempt["error"]
    assert state["stages"]["tok"]["status"] == "done"
    assert (run_dir / "tok" / "final" / "info.json").read_text() == before
    assert "ev" in json.loads((run_dir / "metrics.json").read_text())  # untouched, from run 1
    fake_stages.BEHAVIOUR.clear()
    assert go(write_recipe, run_dir, ["stages.pre.train.lr=0.2"]) == ["pre", "ev"]


def test_user_error_in_stage_is_exit_2(write_recipe, tmp_path):
    fake_stages.BEHAVIOUR["pre"] = "user_error"
    with pytest.raises(UserError, match="stages.pre.data: column 'text' not found"):
        go(write_recipe, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (
        state["stages"]["pre"]["status"] == "failed" and state["stages"]["tok"]["status"] == "done"
    )


def test_lock_refuses_a_second_run(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        with pytest.raises(UserError, match=f"in use by another mlsteps run \\(pid {os.getpid()}"):
            go(write_recipe, run_dir)


def test_stale_lock_is_taken_over(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("pid 999999 on elsewhere")  # holder died: no flock held
    assert go(write_recipe, run_dir) == ["tok", "pre", "other", "ev"]


def test_unwritable_run_dir_is_a_user_error(write_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the run directory"):
        go(write_recipe, blocker / "run")


def test_missing_data_file_fails_before_work(write_recipe, tmp_path):
    with pytest.raises(UserError, match="data file '/nonexistent.txt' not found"):
        go(write_recipe, tmp_path / "run", ["stages.pre.data=/nonexistent.txt"])
    assert not (tmp_path / "run").exists()


def _cli(args, **kw):
    script = Path(__file__).resolve().parents[1] / "fake_stages.py"
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_safe_point_and_rerun_resumes(write_recipe, tmp_path, sig):
    recipe = write_recipe(RECIPE)
    run_dir = tmp_path / "run"
    env = {**os.environ, "FAKE_PRE": "wait_for_stop"}
    proc = _cli(["run", str(recipe), "--run-dir", str(run_dir)], env=env)
    deadline = time.monotonic() + 30
    while not (run_dir / "pre" / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["pre"]["interrupted"] is True
    assert "ev" not in state["stages"]
    step = int((run_dir / "pre" / "checkpoints" / "step").read_text())
    proc = _cli(["run", str(recipe), "--run-dir", str(run_dir), "--json"], env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["stages"]["tok"]["skipped"] is True
    assert result["stages"]["pre"]["metrics"]["resumed_from"] == step


def test_stage_without_final_is_skipped_and_missing_outputs_rerun(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    fake_stages.BEHAVIOUR["ev"] = "metrics_only"
    go(write_recipe, run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["ev"]["outputs"] == {"predictions": "ev/predictions.jsonl"}
    assert go(write_recipe, run_dir) == []
    # Outputs deleted by hand: the stage is no longer done, it runs again.
    import shutil

    shutil.rmtree(run_dir / "pre" / "final")
    assert go(write_recipe, run_dir) == ["pre", "ev"]


def test_builtin_names_and_splits_are_checked_before_work(write_recipe, tmp_path):
    with pytest.raises(
        UserError,
        match=r"stages.pre.data.builtin: unknown builtin data set 'toy/corpse'.*toy/corpus",
    ):
        go(write_recipe, tmp_path / "run", ["stages.pre.data={builtin: toy/corpse}"])
    with pytest.raises(
        UserError, match=r"stages.pre.data.split: builtin 'toy/corpus' has no split 'dev'"
    ):
        go(write_recipe, tmp_path / "run", ["stages.pre.data={builtin: toy/corpus, split: dev}"])
    assert not (tmp_path / "run").exists()


def test_stale_temp_files_of_killed_writes_are_removed(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    go(write_recipe, run_dir)
    (run_dir / ".state.json.abc123.tmp").write_text("{half")
    go(write_recipe, run_dir)
    assert not list(run_dir.glob(".*.tmp"))


def test_a_lost_report_is_written_again_when_nothing_runs(write_recipe, tmp_path):
    """Killed while writing the last report.md: the rerun skips every stage and still leaves a
    report that shows them all; an up-to-date report is left alone."""
    import os

    run_dir = tmp_path / "run"
    go(write_recipe, run_dir)
    report = run_dir / "report.md"
    report.unlink()
    assert go(write_recipe, run_dir) == []
    assert "## ev\n" in report.read_text()
    stamp = report.stat().st_mtime - 100
    os.utime(run_dir / "state.json", (stamp - 10, stamp - 10))
    os.utime(run_dir / "metrics.json", (stamp - 10, stamp - 10))
    os.utime(report, (stamp, stamp))
    go(write_recipe, run_dir)
    assert report.stat().st_mtime == stamp  # newer than what it shows: not rewritten
    os.utime(run_dir / "state.json", (stamp + 10, stamp + 10))  # an older report: rewritten
    go(write_recipe, run_dir)
    assert report.stat().st_mtime > stamp + 10


def test_full_disk_is_a_clear_stage_failure(write_recipe, tmp_path, monkeypatch):
    import errno

    real_run = fake_stages.run

    def full(spec, ctx):
        if ctx.stage == "pre":
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.stage_dir / "x"))
        return real_run(spec, ctx)

    monkeypatch.setattr(fake_stages, "run", full)
    with pytest.raises(
        StageFailed,
        match=r"stages.pre: disk full \(No space left on device\) while writing .*pre/x \(free space",
    ):
        go(write_recipe, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (
        state["stages"]["pre"]["status"] == "failed" and state["stages"]["tok"]["status"] == "done"
    )

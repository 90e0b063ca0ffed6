"""SIGTERM / Ctrl-C (SIGINT) sent to ``python -m mlsteps run`` subprocesses, in every training
stage kind: the stage stops at a step boundary, writes a complete checkpoint, exits 130; the
rerun resumes there and ends identical to an uninterrupted run. A second signal aborts at once;
the rerun then restarts from the last complete checkpoint.

(The fast suite covers SIGTERM in pretraining and SIGINT in soft-prompt training inside
test_kill_resume.py's chain; these are the slow, one-process-per-case versions.)
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from relkit import cli, read_json, spawn
from test_kill_resume import (
    assert_identical_to_reference,
    assert_interrupted,
    assert_resumed,
    orphan_temp_files,
)

CASES = [
    ("pre", signal.SIGINT),
    ("sft", signal.SIGTERM),
    ("sft", signal.SIGINT),
    ("soft", signal.SIGTERM),
    ("soft", signal.SIGINT),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "sig"), CASES, ids=[f"{s}-{signal.Signals(g).name}" for s, g in CASES]
)
def test_signal_stops_at_step_boundary_and_rerun_resumes(
    stage: str, sig: int, tmp_path: Path, pipeline_recipe: Path, reference_run: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = ["run", pipeline_recipe, "--run-dir", run_dir]
    proc = spawn(cmd, tmp_path, fault=rf"/{stage}/checkpoints/checkpoint-2/COMPLETE$", tag="sig")
    proc.wait_paused()
    proc.signal(sig)
    proc.resume()
    res = proc.finish()
    step = assert_interrupted(res, run_dir, stage, signal.Signals(sig).name)
    assert step == 3
    res = cli(*cmd)
    assert res.code == 0, res.err[-3000:]
    assert_resumed(run_dir, reference_run, stage, step, res.err)
    assert_identical_to_reference(run_dir, reference_run)
    assert not orphan_temp_files(run_dir)


@pytest.mark.slow
def test_second_signal_aborts_and_rerun_restarts_from_last_complete(
    tmp_path: Path, pipeline_recipe: Path, reference_run: Path
) -> None:
    """Two Ctrl-C while checkpoint-4 is being marked: abort now (exit 130, no traceback); that
    checkpoint never gets its marker, the rerun resumes checkpoint-2."""
    run_dir = tmp_path / "run"
    cmd = ["run", pipeline_recipe, "--run-dir", run_dir]
    proc = spawn(cmd, tmp_path, fault=r"/pre/checkpoints/checkpoint-4/COMPLETE$", tag="twice")
    proc.wait_paused()
    proc.signal(signal.SIGINT)
    proc.wait_for(lambda: "SIGINT received" in proc.stderr())
    proc.signal(signal.SIGINT)
    res = proc.finish()
    assert res.code == 130, res.err[-3000:]
    assert "Traceback" not in res.err
    assert len(res.error_lines) == 1 and "run the same command again" in res.error_lines[0]
    entry = read_json(run_dir / "state.json")["stages"]["pre"]
    assert entry["status"] == "failed" and entry["interrupted"] is True
    assert not (run_dir / "pre" / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()
    res = cli(*cmd)
    assert res.code == 0, res.err[-3000:]
    assert "ignoring and removing checkpoint-4: no COMPLETE marker" in res.err
    assert_resumed(run_dir, reference_run, "pre", 2, res.err)
    assert_identical_to_reference(run_dir, reference_run)

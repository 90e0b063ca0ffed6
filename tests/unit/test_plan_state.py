"""The run directory's bookkeeping pieces: state.json validation, strict JSON, ownership, swap
recovery. (End-to-end cases are in tests/reliability/test_trust_rundir.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlsteps import stagedirs
from mlsteps.errors import UserError
from mlsteps.rundir import atomic_write_json, check_run_dir, finite_json, read_state


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[1]", "the top level is [1], not a mapping"),
        ("null", "the top level is null"),
        ('{"stages": []}', "'stages' is missing or not a mapping"),
        ("{}", "'stages' is missing"),
        ('{"stages": {"tok": "done"}}', 'stages.tok is "done", not a record'),
        ('{"stages": {"tok": {"status": "finished"}}}', 'stages.tok.status is "finished"'),
        ('{"stages": {"tok": {"status": "done", "outputs": [1]}}}', "stages.tok.outputs"),
        ('{"name": 3, "stages": {}}', "'name' is not a string"),
    ],
)
def test_a_state_json_mlsteps_did_not_write_is_refused(tmp_path: Path, text: str, problem: str):
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(UserError, match="not a valid mlsteps state") as info:
        read_state(tmp_path)
    assert problem in str(info.value) and info.value.where == str(tmp_path / "state.json")


def test_a_valid_state_and_a_missing_one(tmp_path: Path):
    assert read_state(tmp_path) is None
    state = {"name": "x", "stages": {"a": {"status": "done", "fingerprint": "f", "outputs": {}}}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert read_state(tmp_path) == state


def test_finite_json_keeps_the_reason_next_to_the_null():
    problems: list[str] = []
    value = {"ev": {"m": {"ppl": math.nan, "bleu": 1.0}}, "curve": [1.0, math.inf], "n": -math.inf}
    assert finite_json(value, problems) == {
        "ev": {"m": {"ppl": None, "ppl_error": "non-finite (nan)", "bleu": 1.0}},
        "curve": [1.0, None],
        "n": None,
        "n_error": "non-finite (-inf)",
    }
    assert problems == ["ev.m.ppl = nan", "curve[1] = inf", "n = -inf"]


def test_atomic_write_json_is_strict(tmp_path: Path):
    atomic_write_json(tmp_path / "m.json", {"x": math.nan})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"x": None, "x_error": "non-finite (nan)"}


def test_ownership_of_a_directory(tmp_path: Path):
    assert check_run_dir(tmp_path / "new", "r", force=False) is None
    (tmp_path / ".lock").write_text("pid 1")
    (tmp_path / ".state.json.abcd1234.tmp").write_text("{")
    assert check_run_dir(tmp_path, "r", force=False) is None  # what a kill at the start leaves
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an mlsteps run directory: it holds notes.txt"):
        check_run_dir(tmp_path, "r", force=False)
    (tmp_path / "state.json").write_text('{"name": "r", "stages": {}}')
    assert check_run_dir(tmp_path, "r", force=False) == {"name": "r", "stages": {}}
    with pytest.raises(UserError, match="belongs to recipe 'r', not 'q'"):
        check_run_dir(tmp_path, "q", force=False)
    assert check_run_dir(tmp_path, "q", force=True) is not None


def _stage(root: Path, fp: str) -> Path:
    root.mkdir()
    stagedirs.write_record(
        root,
        {"stage": "a", "status": "done", "fingerprint": fp, "outputs": {}, "metrics": {"x": 1}},
    )
    return root


@pytest.mark.parametrize("moment", ["old-moved", "new-in-place", "both-present"])
def test_recover_finishes_a_swap_cut_short(tmp_path: Path, moment: str):
    state = {"stages": {"a": {"status": "done", "fingerprint": "old", "outputs": {}}}}
    metrics: dict[str, object] = {}
    if moment == "old-moved":  # killed between the two renames
        _stage(stagedirs.old_dir(tmp_path, "a"), "old")
        _stage(stagedirs.next_dir(tmp_path, "a"), "new")
    elif moment == "new-in-place":  # killed before state.json was written
        _stage(stagedirs.old_dir(tmp_path, "a"), "old")
        _stage(tmp_path / "a", "new")
    else:  # killed before the first rename
        _stage(tmp_path / "a", "old")
        _stage(stagedirs.next_dir(tmp_path, "a"), "new")
    stagedirs.recover(tmp_path, state)
    assert stagedirs.adopt_records(tmp_path, state, metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert state["stages"]["a"]["fingerprint"] == "new" and metrics == {"a": {"x": 1}}


def test_an_unfinished_build_is_undone(tmp_path: Path):
    """No complete build: the old results go back in place, the attempt stays for a resume."""
    state = {"stages": {"a": {"status": "done", "fingerprint": "old", "outputs": {}}}}
    _stage(stagedirs.old_dir(tmp_path, "a"), "old")
    stagedirs.start_build(tmp_path, "a", "new", "now")
    stagedirs.recover(tmp_path, state)
    assert not stagedirs.adopt_records(tmp_path, state, {"a": {"x": 1}})
    assert stagedirs.read_record(tmp_path / "a")["fingerprint"] == "old"  # type: ignore[index]
    assert stagedirs.attempt_fingerprint(tmp_path, "a") == "new"


def test_a_build_folder_mlsteps_did_not_mark_is_not_deleted(tmp_path: Path):
    nxt = stagedirs.next_dir(tmp_path, "a")
    nxt.mkdir()
    (nxt / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not made by mlsteps"):
        stagedirs.remove_build(tmp_path, "a")
    assert (nxt / "mine.txt").exists()

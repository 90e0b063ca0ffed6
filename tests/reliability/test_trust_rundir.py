"""Trust in the run directory: nothing a user owns is lost, nothing is silently misread.

The runner only ever deletes what state.json records as its own, keeps a stage's last good
results until a re-run of it is complete, rebuilds lost run-level files from the stages' own
records, refuses a state.json it did not write, writes strict JSON and honours the umask.

Fake stages (tests/fake_stages.py) stand in for training, so every case runs in well under a
second through the real CLI (in this process; a subprocess where a signal or kill -9 is needed).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from relkit import REPO, cli, subprocess_env, tree_hashes

sys.path.insert(0, str(REPO / "tests"))
import fake_stages  # noqa: E402

RECIPE = """\
name: trust
stages:
  tok: {kind: tokenizer, from: some/tokenizer}
  pre: {kind: pretrain, from: some/model, tokenizer: tok, data: "builtin:toy/corpus"}
  other: {kind: tokenizer, from: some/other}
  ev: {kind: eval, models: [pre], data: "builtin:toy/corpus", metrics: [perplexity]}
"""
RUN_FILES = ("state.json", "metrics.json", "report.md", "recipe.yaml", "env.json")


@pytest.fixture(autouse=True)
def fake(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if "real_stage" in request.node.name:
        yield  # the real stage code, on the tiny pipeline
        return
    for kind in ("tokenizer", "pretrain", "finetune", "prompt", "eval", "predict"):
        monkeypatch.setitem(sys.modules, f"mlsteps.stages.{kind}", fake_stages)
    fake_stages.CALLS.clear()
    fake_stages.BEHAVIOUR.clear()
    yield


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def run(recipe: Path, run_dir: Path | str, *args: str, cwd: Path | None = None):  # type: ignore[no-untyped-def]
    fake_stages.CALLS.clear()
    return cli("run", recipe, "--run-dir", run_dir, *args, cwd=cwd)


def one_error(res) -> str:  # type: ignore[no-untyped-def]
    """Exit 2 with exactly one clean error line; returns it."""
    assert res.code == 2, res.err
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    assert len(res.error_lines) == 1, res.err
    return res.error_lines[0]


def snapshot(run_dir: Path) -> dict[str, str]:
    return tree_hashes(run_dir, skip=(".lock", "env.json"))


# ------------------------------------------------------------- 2. only what mlsteps created


def test_a_directory_with_user_files_is_refused(tmp_path: Path) -> None:
    """`--run-dir .` with a stage named `data`: the user's data/ and .tmp files stay."""
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text('{"text": "mine"}\n')
    (work / ".draft.tmp").write_text("my notes")
    (work / "r.yaml").write_text(
        RECIPE.replace("  tok:", "  data:").replace("tokenizer: tok", "tokenizer: data")
    )
    before = tree_hashes(work)
    line = one_error(run(work / "r.yaml", ".", cwd=work))
    assert "not an mlsteps run directory" in line and "no state.json" in line
    assert "--run-dir" in line  # what to do
    assert tree_hashes(work) == before  # not even a .lock was written
    assert not (work / ".lock").exists() and fake_stages.CALLS == []


def test_an_empty_run_dir_option_is_refused(tmp_path: Path, recipe: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    line = one_error(run(recipe, "", cwd=work))
    assert "--run-dir is empty" in line
    assert list(work.iterdir()) == [] and fake_stages.CALLS == []


def test_another_recipes_run_dir_is_refused_unless_forced(tmp_path: Path, recipe: Path) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    before = snapshot(run_dir)
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.replace("name: trust", "name: intruder"))
    line = one_error(run(other, run_dir))
    assert "belongs to recipe 'trust', not 'intruder'" in line and "--force" in line
    assert snapshot(run_dir) == before and fake_stages.CALLS == []
    res = run(other, run_dir, "--force")
    assert res.code == 0, res.err
    assert json.loads((run_dir / "state.json").read_text())["name"] == "intruder"
    assert fake_stages.CALLS == ["tok", "pre", "other", "ev"]


def test_a_folder_state_json_does_not_record_is_never_written_or_deleted(
    tmp_path: Path, recipe: Path
) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    (run_dir / "extra").mkdir()
    (run_dir / "extra" / "mine.txt").write_text("keep me")
    (run_dir / ".mine.tmp").write_text("keep me too")
    (run_dir / ".state.json.abcd1234.tmp").write_text("{half")  # ours: a killed atomic write
    line = one_error(run(recipe, run_dir, "stages.extra={kind: tokenizer, from: x}"))
    assert "'extra'" in line and "not made by mlsteps" in line
    assert (run_dir / "extra" / "mine.txt").read_text() == "keep me"
    assert (run_dir / ".mine.tmp").read_text() == "keep me too"
    assert "extra" not in json.loads((run_dir / "state.json").read_text())["stages"]
    assert run(recipe, run_dir).code == 0
    assert (run_dir / ".mine.tmp").exists() and not (run_dir / ".state.json.abcd1234.tmp").exists()


def test_single_stage_commands_keep_their_run_dirs(tmp_path: Path) -> None:
    res = cli("tokenizer", "--from", "some/tokenizer", cwd=tmp_path)
    assert res.code == 0, res.err
    assert (tmp_path / "runs" / "tokenizer" / "tokenizer" / "final").is_dir()
    res = cli("tokenizer", "--from", "some/tokenizer", "--json", cwd=tmp_path)
    assert res.code == 0 and json.loads(res.out)["stages"]["tokenizer"]["skipped"] is True
    res = cli("tokenizer", "--from", "some/tokenizer", "--run-dir", "elsewhere", cwd=tmp_path)
    assert res.code == 0 and (tmp_path / "elsewhere" / "tokenizer" / "final").is_dir()
    line = one_error(cli("tokenizer", "--from", "x", "--run-dir", "", cwd=tmp_path))
    assert "--run-dir is empty" in line


# ------------------------------------------------- 3. nothing replaced before it is good


@pytest.mark.parametrize(("mode", "code"), [("fail", 1), ("user_error", 2)])
def test_a_failed_rerun_of_a_changed_stage_keeps_the_last_good_results(
    tmp_path: Path, recipe: Path, mode: str, code: int
) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    before = snapshot(run_dir)
    fake_stages.BEHAVIOUR["pre"] = mode
    res = run(recipe, run_dir, "stages.pre.train.lr=0.5")  # changes pre (and ev, downstream)
    assert res.code == code, res.err
    assert fake_stages.CALLS == ["pre"]
    after = {k: v for k, v in snapshot(run_dir).items() if not k.startswith(".pre.next/")}
    assert after == before  # final/, stage records, state.json, metrics.json, report.md, recipe
    assert "previous results in pre/" in res.err
    shown = cli("report", run_dir)  # what is kept, and that the re-run did not take
    assert shown.code == 0 and "pre: a re-run failed" in shown.out.replace("\n", " ")
    # Fixed: the re-run completes and replaces the old results in one swap.
    fake_stages.BEHAVIOUR.clear()
    res = run(recipe, run_dir, "stages.pre.train.lr=0.5")
    assert res.code == 0, res.err
    assert fake_stages.CALLS == ["pre", "ev"]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".pre.")]
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert state["pre"]["outputs"] == {"final": "pre/final"}
    assert "lr: 0.5" in (run_dir / "recipe.yaml").read_text()


def _fake_cli(args: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fake_stages.py"), *map(str, args)],
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_interrupted_rebuild_keeps_the_old_results_and_resumes(
    tmp_path: Path, recipe: Path
) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    before = snapshot(run_dir)
    args = ["run", recipe, "--run-dir", run_dir, "stages.pre.train.lr=0.5"]
    proc = _fake_cli(args, FAKE_PRE="wait_for_stop")
    deadline = time.monotonic() + 60
    while not (run_dir / ".pre.next" / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith(".pre.next/")} == before
    step = int((run_dir / ".pre.next" / "checkpoints" / "step").read_text())
    res = run(recipe, run_dir, "stages.pre.train.lr=0.5", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["stages"]["pre"]["metrics"]["resumed_from"] == step
    assert json.loads((run_dir / "state.json").read_text())["stages"]["pre"]["resumed"] is True
    assert (run_dir / "pre" / "checkpoints" / "step").exists()


@pytest.mark.parametrize(
    "moment",
    [r"/run/\.pre\.old$", r"/run/pre$", r"/run/state\.json$@1"],
    ids=["before-old-aside", "between-renames", "before-state"],
)
def test_kill_9_inside_the_swap_loses_nothing(tmp_path: Path, recipe: Path, moment: str) -> None:
    """A changed 'pre' finished aside; kill -9 at each step of putting it in place. The rerun
    completes the swap from the stage's own record: the new results, nothing run twice."""
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    flag, cont = tmp_path / "paused", tmp_path / "go"
    args = ["run", recipe, "--run-dir", run_dir, "stages.pre.train.lr=0.5"]
    proc = _fake_cli(
        args,
        MLSTEPS_FAULT_AT=moment,
        MLSTEPS_FAULT_FLAG=str(flag),
        MLSTEPS_FAULT_CONTINUE=str(cont),
    )
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (run_dir / "pre").is_dir() or (run_dir / ".pre.old").is_dir()  # never both gone
    res = run(recipe, run_dir, "stages.pre.train.lr=0.5")
    assert res.code == 0, res.err
    assert fake_stages.CALLS == ["ev"]  # pre's complete build was adopted, not redone
    reference = tmp_path / "ref"
    assert run(recipe, reference, "stages.pre.train.lr=0.5").code == 0
    ours = json.loads((run_dir / "state.json").read_text())["stages"]["pre"]
    theirs = json.loads((reference / "state.json").read_text())["stages"]["pre"]
    assert ours["fingerprint"] == theirs["fingerprint"] and ours["status"] == "done"
    assert json.loads((run_dir / "metrics.json").read_text())["pre"]["loss"] == 1.5
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".pre.")]


# ------------------------------------------------------- 4. run-level files lost or damaged


def test_deleted_metrics_json_is_rebuilt_from_the_stages(tmp_path: Path, recipe: Path) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    res = cli("report", run_dir, "--json")
    assert res.code == 0 and json.loads(res.out) == metrics
    assert run(recipe, run_dir).code == 0 and fake_stages.CALLS == []
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    report = run_dir / "report.md"  # rewritten after the rebuild, not left stale
    assert report.stat().st_mtime_ns >= (run_dir / "metrics.json").stat().st_mtime_ns
    assert "| resumed_from | 0 |" in report.read_text()


@pytest.mark.parametrize("text", ["[1]", '{"stages": []}', '{"stages": {"tok": "done"}}', "null"])
def test_a_state_json_of_the_wrong_shape_is_refused(
    tmp_path: Path, recipe: Path, text: str
) -> None:
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    (run_dir / "state.json").write_text(text)
    before = snapshot(run_dir)
    line = one_error(run(recipe, run_dir))
    assert "state.json" in line and "not a valid mlsteps state" in line
    assert "nothing was changed" in line
    assert snapshot(run_dir) == before and fake_stages.CALLS == []
    assert "state.json" in one_error(cli("report", run_dir))


def test_report_of_a_run_that_has_not_finished_a_stage(tmp_path: Path) -> None:
    """What a kill -9 inside the first stage leaves: a running stage, nothing finished."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    entry = {"kind": "tokenizer", "status": "running", "fingerprint": "f" * 16,
             "started_at": "2026-12-01T09:00:00+00:00", "resumed": False}  # fmt: skip
    (run_dir / "state.json").write_text(json.dumps({"name": "trust", "stages": {"tok": entry}}))
    res = cli("report", run_dir)
    assert res.code == 0, res.err
    assert "tok" in res.out and "running" in res.out
    res = cli("report", run_dir, "--json")
    assert res.code == 0 and json.loads(res.out) == {}


def test_the_report_describes_the_current_recipe(tmp_path: Path, recipe: Path) -> None:
    run_dir = tmp_path / "run"
    fake_stages.BEHAVIOUR["other"] = "user_error"
    assert run(recipe, run_dir).code == 2
    assert "| [other](#other) | tokenizer | failed |" in (run_dir / "report.md").read_text()
    fake_stages.BEHAVIOUR.clear()
    res = run(recipe, run_dir, "~stages.other")
    assert res.code == 0, res.err
    report = (run_dir / "report.md").read_text()
    assert "## other" not in report and "[other](#other)" not in report
    assert "| [ev](#ev) | eval | done |" in report
    # Removed after a run in which nothing else changed: the report follows too.
    assert run(recipe, run_dir, "~stages.other", "~stages.ev").code == 0
    assert fake_stages.CALLS == [] and "## ev" not in (run_dir / "report.md").read_text()


# ------------------------------------------------ 6/7. strict JSON, JSON errors, file modes


def _strict(text: str):  # type: ignore[no-untyped-def]
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_strict_json_and_reported(tmp_path: Path, recipe: Path) -> None:
    run_dir = tmp_path / "run"
    fake_stages.BEHAVIOUR["ev"] = "nan"
    res = run(recipe, run_dir, "--json")
    assert res.code == 0, res.err
    metrics = _strict((run_dir / "metrics.json").read_text())["ev"]
    assert metrics == {
        "perplexity": None, "perplexity_error": "non-finite (nan)",
        "loss": None, "loss_error": "non-finite (inf)", "n": 3,
    }  # fmt: skip
    assert _strict(res.out)["stages"]["ev"]["metrics"]["perplexity"] is None
    assert "warning: [ev] metric perplexity = nan is not a finite number" in res.err
    for name in ("state.json", "env.json", "ev/stage.json"):
        _strict((run_dir / name).read_text())
    assert "| perplexity | n/a: non-finite (nan) |" in (run_dir / "report.md").read_text()
    assert _strict(cli("report", run_dir, "--json").out)["ev"] == metrics


def test_a_real_stage_scoring_a_nan_model_writes_strict_json(
    tmp_path: Path, mini_run: Path, torch_threads: None
) -> None:
    """The eval stage on a model whose weights hold NaN: exit 0, perplexity null with its reason
    (was a bare NaN in metrics.json), a warning on stderr, n/a in the report."""
    import torch
    from relkit import MINI, copy_run
    from safetensors.torch import load_file, save_file

    run_dir = copy_run(mini_run, tmp_path / "run")
    weights = run_dir / "pre" / "final" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(v, math.nan) for k, v in tensors.items()}, str(weights))
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(
        MINI + "  ppl:\n    kind: eval\n    models: [pre]\n"
        "    data: {builtin: toy/corpus, split: test, max_samples: 4}\n    metrics: [perplexity]\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    ppl = _strict((run_dir / "metrics.json").read_text())["ppl"]["pre"]
    assert ppl["perplexity"] is None and ppl["perplexity_error"] == "non-finite (nan)"
    assert "warning: [ppl] metric pre.perplexity = nan is not a finite number" in res.err
    assert "n/a: non-finite (nan)" in (run_dir / "report.md").read_text()


def test_json_commands_print_a_json_error_when_they_fail(tmp_path: Path, recipe: Path) -> None:
    res = cli("report", tmp_path, "--json")
    assert res.code == 2
    error = json.loads(res.out)["error"]
    assert error["exit_code"] == 2 and "not a run directory" in error["message"]
    assert error["where"] == str(tmp_path) and error["hint"]
    run_dir = tmp_path / "run"
    assert run(recipe, run_dir).code == 0
    (run_dir / "state.json").write_text("[1]")
    res = run(recipe, run_dir, "--json")
    error = json.loads(res.out)["error"]
    assert res.code == 2 and error["where"] == str(run_dir / "state.json")
    res = cli("run", recipe, "--json", "--from")  # a usage error (click's own)
    assert res.code == 2 and json.loads(res.out)["error"]["exit_code"] == 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_level_files_honour_the_umask(tmp_path: Path, recipe: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        assert run(recipe, run_dir).code == 0
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    stage_file = run_dir / "tok" / "final" / "info.json"  # written by the stage: plain open()
    assert stage_file.stat().st_mode & 0o777 == expected
    for name in (*RUN_FILES, "tok/stage.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == expected, name

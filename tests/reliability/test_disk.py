"""A full disk: the run directory on a small tmpfs fills up during training. The stage fails with
one clear line (exit 1), nothing half-written is ever taken for complete, earlier stages are
untouched, and once space is freed the same command completes with the uninterrupted results.

Needs root with mount rights (checked; skipped elsewhere). The mount is private to the test and
removed afterwards.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from relkit import MINI, cli, comparable, read_json, tree_hashes


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    point = tmp_path / "disk"
    point.mkdir()

    def mount(size: str) -> Path:
        if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)):
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        return point

    def grow(size: str) -> None:
        assert _mount("-o", f"remount,size={size}", str(point))

    yield mount, grow
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _check_full_disk_failure(res, run_dir: Path, mini_run: Path) -> None:  # type: ignore[no-untyped-def]
    from mlsteps.engine.checkpoints import COMPLETE_MARKER, checkpoint_problem, list_checkpoints

    assert res.code in (1, 2), res.err[-3000:]
    assert "Traceback" not in res.err, res.err[-3000:]
    assert len(res.error_lines) == 1 and res.err_lines[-1] == res.error_lines[0], res.err[-3000:]
    line = res.error_lines[0]
    assert "No space left on device" in line, line
    assert len(line) < 400, line
    # The place and the fix: which directory filled up and what to do.
    assert str(run_dir) in line or "stages.pre" in line or "stage 'pre'" in line, line
    assert "free" in line.lower() or "space" in line.split("No space left on device")[-1], line
    if (run_dir / "tok" / "final").exists():
        assert tree_hashes(run_dir / "tok" / "final") == tree_hashes(mini_run / "tok" / "final")
    for ckpt in list_checkpoints(run_dir / "pre" / "checkpoints"):
        if (ckpt / COMPLETE_MARKER).exists():
            assert checkpoint_problem(ckpt) is None, f"{ckpt.name}: {checkpoint_problem(ckpt)}"
    assert not (run_dir / "pre" / "final").exists() or tree_hashes(
        run_dir / "pre" / "final"
    ) == tree_hashes(mini_run / "pre" / "final")


@pytest.mark.parametrize(
    "size",
    [
        pytest.param("1m", id="during-checkpoint"),
        pytest.param("300k", id="during-first-checkpoint", marks=pytest.mark.slow),
        pytest.param("1400k", id="during-final", marks=pytest.mark.slow),
    ],
)
def test_full_disk_fails_cleanly_and_rerun_completes(
    size: str,
    tmp_path: Path,
    small_disk,
    mini_run: Path,  # type: ignore[no-untyped-def]
) -> None:
    mount, grow = small_disk
    run_dir = mount(size) / "run"
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(MINI)
    res = cli("run", recipe, "--run-dir", run_dir)
    _check_full_disk_failure(res, run_dir, mini_run)
    state = read_json(run_dir / "state.json")["stages"]
    assert state["pre"]["status"] == "failed", state
    assert state["tok"]["status"] == "done"

    grow("64m")
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert "[tok] up to date, skipped" in res.err
    assert comparable(read_json(run_dir / "metrics.json")) == comparable(
        read_json(mini_run / "metrics.json")
    )
    assert tree_hashes(run_dir / "pre" / "final") == tree_hashes(mini_run / "pre" / "final")

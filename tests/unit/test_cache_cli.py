"""`mlsteps cache ls|clear`: lists and removes only what mlsteps wrote (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlsteps import cache

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MLSTEPS_CACHE=str(root), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "mlsteps", "cache", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _entry(root: Path, key: str, blocks: int) -> Path:
    tmp = cache.begin(key, root)
    (tmp / "blocks.int32").write_bytes(b"\0" * 4 * 8 * blocks)
    manifest = {"n_blocks": blocks, "block_len": 8, "n_tokens": 8 * blocks, "what": "training text"}
    return cache.publish(tmp, key, manifest, root)


def test_root_from_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLSTEPS_CACHE", str(tmp_path / "m"))
    assert cache.cache_root() == tmp_path / "m"
    monkeypatch.delenv("MLSTEPS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.cache_root() == tmp_path / "x" / "mlsteps"


def test_publish_is_atomic_and_first_writer_wins(tmp_path: Path) -> None:
    tmp = cache.begin("k1", tmp_path)
    assert cache.lookup("k1", tmp_path) is None  # a partial entry is never found
    (tmp / "blocks.int32").write_bytes(b"a")
    final = cache.publish(tmp, "k1", {"n_blocks": 1}, tmp_path)
    assert cache.lookup("k1", tmp_path) == final and not tmp.exists()
    assert not (final / cache.PARTIAL_MARKER).exists()
    # A second writer of the same key (another rank) keeps the first entry and drops its own.
    other = cache.begin("k1", tmp_path)
    (other / "blocks.int32").write_bytes(b"b")
    assert cache.publish(other, "k1", {"n_blocks": 1}, tmp_path) == final
    assert (final / "blocks.int32").read_bytes() == b"a" and not other.exists()


def test_ls_and_clear_touch_only_mlsteps_entries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _entry(root, "a" * 32, 3)
    _entry(root, "b" * 32, 5)
    # A partial entry of a writer that died (a finished child's pid), one of a live writer (us).
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = cache.begin("c" * 32, root)
    marker = json.loads((dead / cache.PARTIAL_MARKER).read_text())
    (dead / cache.PARTIAL_MARKER).write_text(json.dumps({**marker, "pid": int(child.stdout)}))
    live = cache.begin("d" * 32, root)
    # Things that are not ours: a user's file and folders without (or with a foreign) marker.
    (root / "notes.txt").write_text("mine")
    (root / "packed" / "e").mkdir()
    foreign = root / "packed" / ("f" * 32)
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    fake_partial = root / "packed" / ".partial-zzz"
    fake_partial.mkdir()

    res = _cli("ls", "--json", root=root)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert [e["key"] for e in listed["entries"]] == ["a" * 32, "b" * 32]
    assert [e["blocks"] for e in listed["entries"]] == [3, 5]
    plain = _cli("ls", root=root).stdout
    assert "2 entries" in plain and "a" * 32 in plain

    res = _cli("clear", "--json", root=root)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed"] == 3  # two entries + the dead writer's partial
    left = sorted(p.name for p in (root / "packed").iterdir())
    assert left == sorted([".partial-zzz", "e", "f" * 32, live.name])
    assert (root / "notes.txt").read_text() == "mine"
    assert json.loads(_cli("ls", "--json", root=root).stdout)["entries"] == []


def test_cache_commands_import_no_heavy_modules(tmp_path: Path) -> None:
    code = (
        "import sys; from mlsteps.cli import main\n"
        "try:\n    main(['cache', 'ls'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = dict(os.environ, MLSTEPS_CACHE=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr

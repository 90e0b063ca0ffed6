"""The front door: `mlsteps init` writes a packaged recipe (never over a file), `--list` names
them, a bare packaged name runs/validates the embedded recipe; hub datasets are cached in the
user's HF cache, not inside the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlsteps import starters
from mlsteps.cli import main
from mlsteps.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "mlsteps", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_packaged_recipes_are_configs() -> None:
    """In a checkout the packaged recipes are configs/ itself (one source; the wheel test checks
    that a built wheel carries the same files)."""
    found = starters.recipes()
    assert found["quickstart"] == REPO / "configs" / "quickstart.yaml"
    assert found["alignment"] == REPO / "configs" / "alignment.yaml"
    examples = {p.stem for p in (REPO / "configs" / "examples").glob("*.yaml")}
    assert set(found) == {"quickstart", "alignment"} | examples
    for name, path in found.items():
        assert starters.summary(path), f"{name}: no leading comment saying what it is"


def test_init_writes_and_never_overwrites(tmp_path: Path) -> None:
    made = _cli(["init"], tmp_path)
    assert made.returncode == 0, made.stderr
    written = tmp_path / "quickstart.yaml"
    assert written.read_bytes() == (REPO / "configs" / "quickstart.yaml").read_bytes()
    written.write_text("# mine\n", encoding="utf-8")
    again = _cli(["init", "quickstart", "."], tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert written.read_text(encoding="utf-8") == "# mine\n"  # untouched
    other = _cli(["init", "alignment", "sub/dir"], tmp_path)
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "sub" / "dir" / "alignment.yaml").is_file()


def test_init_list_and_unknown_names(tmp_path: Path) -> None:
    listed = _cli(["init", "--list"], tmp_path)
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names[:2] == ["alignment", "quickstart"] and "sft-gpt2-local" in names
    assert list(tmp_path.iterdir()) == []  # --list writes nothing
    bad = _cli(["init", "quickstrat"], tmp_path)
    assert bad.returncode == 2 and "did you mean 'quickstart'" in bad.stderr


def test_bare_name_validates_the_packaged_recipe(tmp_path: Path, capsys) -> None:
    ok = _cli(["validate", "quickstart", "--json"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "quickstart"
    # A file of that name in the working directory wins over the packaged recipe.
    (tmp_path / "quickstart").write_text("name: mine\nstages: {}\n", encoding="utf-8")
    mine = _cli(["validate", "quickstart"], tmp_path)
    assert "quickstart" in mine.stderr + mine.stdout and "'quickstart'" not in mine.stdout
    with pytest.raises(UserError, match="no packaged recipe of that name"):
        starters.resolve(Path("quickstrat"))
    # A path-like argument is never taken for a packaged name.
    assert starters.resolve(Path("configs/nothing.yaml")) == Path("configs/nothing.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["run", "quikstart"])
    assert exc.value.code == 2
    assert "did you mean 'quickstart'" in capsys.readouterr().err


def test_hub_datasets_use_the_users_hf_cache(tmp_path: Path) -> None:
    """A hub dataset (here a local dataset directory, loaded through the same call) is cached
    under HF_DATASETS_CACHE, shared by every run, not copied into the run directory."""
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    rows = [{"text": f"row {i} about a small toy town"} for i in range(50)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: hubcache\nstages:\n"
        f"  tok: {{kind: tokenizer, data: {{hub: {tmp_path / 'ds'}}}, vocab_size: 300}}\n",
        encoding="utf-8",
    )
    hf_cache = tmp_path / "hf-datasets"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_DATASETS_CACHE": str(hf_cache),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mlsteps", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    in_run = [p for p in (tmp_path / "run").rglob("*.arrow")]
    assert in_run == [], in_run
    assert list(hf_cache.rglob("*.arrow")), "nothing cached in HF_DATASETS_CACHE"

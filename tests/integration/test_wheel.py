"""The packaged recipes from a built wheel, installed in a clean venv: `mlsteps init` and
`mlsteps run quickstart` work without the repository (no network: the wheel is built without
build isolation, and the venv reuses this environment's installed dependencies through a .pth
file, added after the wheel is installed so pip never sees this environment's own mlsteps)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The quickstart, as short as it runs (every stage, a few steps each).
TINY = [
    "stages.pretrain.train.max_steps=3",
    "stages.pretrain.train.eval_every_steps=3",
    "stages.translate.train.max_steps=3",
    "stages.translate.train.eval_every_steps=3",
    "stages.translate.validation_max_samples=2",
    "stages.translate_scratch.train.max_steps=3",
    "stages.translate_scratch.train.eval_every_steps=3",
    "stages.translate_scratch.validation_max_samples=2",
    "stages.prompt_tuning.train.max_steps=2",
    "stages.prompt_tuning.train.eval_every_steps=2",
    "stages.prompt_tuning.data.max_samples=40",
    "stages.prompt_tuning.validation.max_samples=2",
    "stages.eval.data.max_samples=4",
    "stages.eval.generation.max_new_tokens=8",
    "stages.predict.data.max_samples=2",
    "stages.predict.generation.max_new_tokens=8",
]


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (the tests put the checkout on it): only the installed wheel is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"  # a copy: building in the checkout would leave build/ and egg-info
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("mlsteps", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("mlsteps-*.whl")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # A plain path line: this environment's packages, after the venv's own (its mlsteps wins).
    deps = [p for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages()] if p]
    (Path(purelib) / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return env_dir


def _mlsteps(venv: Path, cwd: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "mlsteps"), *args],
        cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_wheel_carries_the_recipes(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import mlsteps, mlsteps.starters as s; print(mlsteps.__file__); print(s.recipes_dir())"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert where[0].startswith(str(venv)), where  # the installed copy, not the checkout
    assert where[1] == str(Path(where[0]).parent / "recipes")
    listed = _mlsteps(venv, tmp_path, "init", "--list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    expected = ["quickstart", "alignment"] + [
        p.stem for p in (REPO / "configs/examples").glob("*.yaml")
    ]
    assert sorted(names) == sorted(expected)
    made = _mlsteps(venv, tmp_path, "init", "sft-gpt2-local", "starter")
    assert made.returncode == 0, made.stderr
    written = tmp_path / "starter" / "sft-gpt2-local.yaml"
    assert written.read_bytes() == (REPO / "configs/examples/sft-gpt2-local.yaml").read_bytes()
    again = _mlsteps(venv, tmp_path, "init", "sft-gpt2-local", "starter")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert _mlsteps(venv, tmp_path, "validate", "quickstart").returncode == 0


@pytest.mark.slow  # the whole quickstart, every stage a few steps: about 90 s on 2 busy cores
def test_run_quickstart_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    proc = _mlsteps(venv, tmp_path, "run", "quickstart", *TINY, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    assert (run / "report.md").is_file() and (run / "metrics.json").is_file()
    assert (run / "predict" / "predictions.jsonl").is_file()
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8")
    assert "name: quickstart" in recipe

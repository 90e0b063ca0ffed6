"""Fixtures of the reliability suite; the helpers and the pipeline recipe are in relkit.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from relkit import MINI_STAGES, PIPELINE, THREADS, cli, read_json


@pytest.fixture(scope="session")
def torch_threads() -> None:
    import torch

    torch.set_num_threads(int(THREADS))


@pytest.fixture(scope="session")
def pipeline_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "pipeline.yaml"
    path.write_text(PIPELINE, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reference_run(
    tmp_path_factory: pytest.TempPathFactory, pipeline_recipe: Path, torch_threads: None
) -> Path:
    """One uninterrupted run of the pipeline (in this process); the yardstick of every fault."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = cli("run", pipeline_recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def mini_run(reference_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run cut down to its first stages (tok, pre): the recipe MINI, finished."""
    run_dir = tmp_path_factory.mktemp("mini") / "run"
    run_dir.mkdir()
    for name in MINI_STAGES:
        shutil.copytree(reference_run / name, run_dir / name, symlinks=True)
    state = read_json(reference_run / "state.json")
    state["stages"] = {k: v for k, v in state["stages"].items() if k in MINI_STAGES}
    metrics = {
        k: v for k, v in read_json(reference_run / "metrics.json").items() if k in MINI_STAGES
    }
    (run_dir / "state.json").write_text(json.dumps(state, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir

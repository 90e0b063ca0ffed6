"""Shared fixtures. Tests never touch the network: hub access is switched off for the session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The packed-data cache (mlsteps.cache) of this test session: never the user's own cache dir.
if "MLSTEPS_CACHE" not in os.environ:
    os.environ["MLSTEPS_CACHE"] = tempfile.mkdtemp(prefix="mlsteps-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MLSTEPS_CACHE"], True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write YAML text to a recipe file and return its path."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write

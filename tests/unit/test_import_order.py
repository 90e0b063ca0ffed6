"""Each recipe-side module imports on its own, first, in a fresh interpreter.

The spec models live inside the recipe package (mlsteps/recipe/specs), and stage_kinds both
imports them and is imported by mlsteps.recipe: importing any of these first must not meet a
half-built module (an import cycle shows only in the order that starts at the wrong end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted(
    f"mlsteps.recipe.specs.{p.stem}"
    for p in (REPO / "mlsteps" / "recipe" / "specs").glob("*.py")
    if p.stem != "__init__"
)
FIRST = [
    "mlsteps.stage_kinds",
    "mlsteps.recipe",
    "mlsteps.recipe.errors",
    "mlsteps.recipe.reference",
    "mlsteps.recipe.specs",
    *SPECS,
    "mlsteps.metrics.table",
    "mlsteps.fingerprint",
    "mlsteps.cli",
]


def test_every_spec_module_is_listed() -> None:
    assert "mlsteps.recipe.specs.base" in SPECS and len(SPECS) >= 10


@pytest.mark.parametrize("module", FIRST)
def test_module_imports_first_on_its_own(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]

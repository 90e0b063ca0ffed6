"""Opening a run directory under its lock: bind a new one to its recipe, repair what a kill
left in an existing one (swaps cut short, lost metrics.json), and keep recipe.yaml with the state
it belongs to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mlsteps import __version__, stagedirs
from mlsteps.errors import UserError
from mlsteps.recipe import Recipe
from mlsteps.rundir import (
    atomic_write_json,
    atomic_write_text,
    check_run_dir,
    is_own_temp_file,
    read_json,
)


def open_run_dir(
    recipe: Recipe, run_dir: Path, force: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Under the lock (rank 0): bind a new run directory to the recipe, or repair what a kill left
    in an existing one. Returns (state, metrics)."""
    state = check_run_dir(run_dir, recipe.name, force=force)  # again: now we hold the lock
    if state is None:
        # Nothing is written yet: the first state.json write (before any other file, see
        # save_state in the runner) is what records the directory as mlsteps' own.
        state = {"name": recipe.name, "mlsteps": __version__, "stages": {}}
    for stale in run_dir.iterdir():
        if is_own_temp_file(stale.name):
            stale.unlink(missing_ok=True)  # an atomic write cut short by a kill
    metrics_hint = "delete it: the next run rebuilds it from the stages' own records"
    metrics: dict[str, Any] = read_json(run_dir / "metrics.json", {}, hint=metrics_hint)
    if not isinstance(metrics, dict):
        raise UserError(
            "metrics.json is not a mapping of stage -> metrics",
            where=str(run_dir / "metrics.json"),
            hint=metrics_hint,
        )
    stagedirs.recover(run_dir, state)
    if stagedirs.adopt_records(run_dir, state, metrics):
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / "state.json", state)
    return state, metrics


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """recipe.yaml: written with the state it belongs to (unchanged text is not rewritten)."""
    path = run_dir / "recipe.yaml"
    text = yaml.safe_dump(recipe.resolved_dict(), sort_keys=False)
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def recipe_changed(run_dir: Path, recipe: Recipe) -> bool:
    try:
        text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return True
    return text != yaml.safe_dump(recipe.resolved_dict(), sort_keys=False)


def report_stale(run_dir: Path) -> bool:
    """report.md is missing or older than the state and metrics it shows."""
    report_path = run_dir / "report.md"
    if not report_path.exists():
        return True
    written = report_path.stat().st_mtime
    sources = [run_dir / "state.json", run_dir / "metrics.json"]
    return any(p.exists() and p.stat().st_mtime > written for p in sources)

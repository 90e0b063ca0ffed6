"""What the report reads from a run directory: the state of the current recipe's stages, their
metrics (a lost stage's filled in from its own record), the recipe, failed re-runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mlsteps import stagedirs
from mlsteps.rundir import read_json, read_state


def _load_recipe(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """(state, metrics, recipe, stages left out) of a run, as the report shows them.

    The stages are those of the current recipe (recipe.yaml), in its order; stages recorded in
    state.json but no longer in the recipe are left out (their names are returned). A done
    stage missing from metrics.json (deleted, lost) is filled in from its own record.
    """
    state = read_state(run_dir) or {"stages": {}}
    hint = "delete it: `mlsteps run` rebuilds it from the stages' own records"
    metrics = read_json(run_dir / "metrics.json", {}, hint=hint) or {}
    if not isinstance(metrics, dict):
        metrics = {}
    recipe = _load_recipe(run_dir)
    recorded: dict[str, Any] = state["stages"]
    specs = recipe.get("stages")
    order = list(specs) if isinstance(specs, dict) and specs else list(recorded)
    state = {**state, "stages": {n: recorded[n] for n in order if n in recorded}}
    for name, entry in state["stages"].items():
        rec = stagedirs.read_record(run_dir / name)
        if name not in metrics and entry.get("status") == "done" and rec:
            if rec["fingerprint"] == entry.get("fingerprint"):
                metrics[name] = rec["metrics"]
    metrics = {n: metrics[n] for n in state["stages"] if n in metrics}
    return state, metrics, recipe, [n for n in recorded if n not in state["stages"]]


def failed_attempt(run_dir: Path, name: str) -> str | None:
    """A failed or stopped re-run of a stage that kept its previous results, in words."""
    nxt = stagedirs.next_dir(run_dir, name)
    try:
        attempt = json.loads((nxt / stagedirs.ATTEMPT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(attempt, dict) or attempt.get("status") != "failed":
        return None
    what = "was stopped" if attempt.get("interrupted") else "failed"
    return (
        f"a re-run {what} ({attempt.get('error')}); the results shown are the previous ones, "
        f"the attempt is in {nxt.name}/"
    )

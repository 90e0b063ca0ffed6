"""What the `mlsteps` commands share (cli.py, cli_stages.py, cli_tools.py): the --json option,
the output mode the error handler reads, strict JSON on stdout, --run-dir, running a recipe.

typer only at module level, like cli.py: `--help` stays instant and torch-free.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

# Set by the command being run; main() reads "json" to report an error as JSON on stdout.
STATE = {"debug": False, "json": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")]


def emit(result: dict[str, Any]) -> None:
    """Strict JSON on stdout (a non-finite number becomes null with its reason next to it)."""
    from mlsteps.rundir import finite_json

    sys.stdout.write(json.dumps(finite_json(result), indent=2, default=str, allow_nan=False) + "\n")


def run_dir_path(text: str | None) -> Path | None:
    """--run-dir as a path; an empty one is an error (Path('') would be the current directory)."""
    if text is None:
        return None
    if not text.strip():
        from mlsteps.errors import UserError

        raise UserError(
            "--run-dir is empty",
            hint="pass a directory (e.g. --run-dir runs/NAME), or leave the option out for "
            "runs/<recipe name>",
        )
    return Path(text)


def execute(spec: Any, run_dir: str | None, *, as_json: bool, **kwargs: Any) -> None:
    from mlsteps.distributed import is_main
    from mlsteps.runner import run_recipe

    target = run_dir_path(run_dir) or Path("runs") / spec.name
    result = run_recipe(spec, target, **kwargs)
    if not is_main():
        return  # rank 0 reports for the whole run
    if as_json:
        emit(result.to_json())
    else:
        done = sum(not s.get("skipped") for s in result.stages.values())
        print(
            f"done: {done} stage(s) run, {len(result.stages) - done} skipped; "
            f"report: {target / 'report.md'}",
            file=sys.stderr,
        )

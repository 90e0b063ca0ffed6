"""The `mlsteps` command line (Typer).

Only typer is imported at module level: `--help` must stay instant, and `validate` must never
import torch/transformers/datasets/peft/accelerate/sacrebleu/rouge_score/nltk. Everything else is
imported inside the command bodies. The cli modules do not use ``from __future__ import
annotations``: typer reads every command's annotations on each start, and string annotations
cost an ``eval`` each (get_command 31 -> 12 ms CPU).
"""

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from mlsteps import cli_stages, cli_tools
from mlsteps.cli_common import STATE, JsonOpt, emit, execute, run_dir_path

app = typer.Typer(
    name="mlsteps",
    help="Multi-step language-model training from one YAML recipe: tokenizer, pretrain, "
    "finetune, prompt learning, eval and predict, each stage handing its model to the next.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (shell detected on use)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[
    Path,
    typer.Argument(
        help="Recipe YAML file, or the name of a packaged recipe (mlsteps init --list).",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides KEY=VALUE (YAML value) or ~KEY to remove.", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from mlsteps import __version__

        print(f"mlsteps {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks and the libraries' full messages."),
    ] = False,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Use only local files and the hub cache (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, "
            "TRANSFORMERS_OFFLINE).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    STATE["debug"] = debug
    if debug:
        os.environ["MLSTEPS_DEBUG"] = "1"  # engine.quiet keeps the libraries' messages
    if offline:
        from mlsteps.hub import set_offline

        set_offline()


@app.command()
def run(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    run_dir: Annotated[
        str | None, typer.Option(help="Run directory (default runs/<name>).")
    ] = None,
    from_stage: Annotated[
        str | None,
        typer.Option(
            "--from-stage",
            "--from",
            help="Re-run this stage and everything after it (--from is the same option).",
        ),
    ] = None,
    only: Annotated[str | None, typer.Option(help="Run only this stage.")] = None,
    force: Annotated[
        bool, typer.Option(help="Re-run every stage, ignoring earlier results.")
    ] = False,
    as_json: JsonOpt = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            help="Launch N processes on this node through torchrun (one per GPU; gloo on CPU).",
        ),
    ] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Number of nodes (multi-node).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank.")] = 0,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Address of node 0 (multi-node).")
    ] = None,
    master_port: Annotated[
        int | None, typer.Option("--master-port", help="Free port on node 0 (multi-node).")
    ] = None,
) -> None:
    """Run a recipe; finished, unchanged stages are skipped and interrupted ones resume."""
    from mlsteps.recipe import check_data_files, load_recipe

    STATE["json"] = as_json
    run_dir_path(run_dir)  # an empty --run-dir is refused before the recipe is even read
    spec = load_recipe(recipe, overrides or [])
    from mlsteps.distributed import inside_launcher

    if nproc_per_node is not None and not inside_launcher():
        # Validate here (exit 2 before any process starts), then re-run this command on every
        # process through torchrun's engine.
        from mlsteps.distributed import LaunchOptions, launch

        check_data_files(spec)
        child = ["--debug"] if STATE["debug"] else []
        child += ["run", str(recipe)]
        for flag, value in (("--run-dir", run_dir), ("--from", from_stage), ("--only", only)):
            if value is not None:
                child += [flag, str(value)]
        child += ["--force"] if force else []
        child += ["--json"] if as_json else []
        child += ["--", *(overrides or [])]
        opts = LaunchOptions(nproc_per_node, nnodes, node_rank, master_addr, master_port)
        raise typer.Exit(launch(opts, child))
    execute(spec, run_dir, from_stage=from_stage, only=only, force=force, as_json=as_json)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None, as_json: JsonOpt = False) -> None:
    """Validate a recipe fully without running anything (no torch import)."""
    from mlsteps.recipe import check_data_files, load_recipe
    from mlsteps.recipe.specs.loading import needs_cuda

    STATE["json"] = as_json
    spec = load_recipe(recipe, overrides or [])
    check_data_files(spec)
    # Whether the machine that runs it has CUDA, validate cannot know (no torch import): it
    # names the settings that need it; `run` refuses them up front where CUDA is absent.
    cuda = [
        (f"stages.{n}.{key}", what) for n, s in spec.stages.items() for key, what in needs_cuda(s)
    ]
    if as_json:
        emit(
            {
                "valid": True,
                "name": spec.name,
                "stages": {n: s.kind for n, s in spec.stages.items()},
                **({"needs_cuda": [where for where, _ in cuda]} if cuda else {}),
            }
        )
    else:
        kinds = ", ".join(f"{n} ({s.kind})" for n, s in spec.stages.items())
        print(f"{recipe}: valid recipe '{spec.name}' with {len(spec.stages)} stage(s): {kinds}")
        for where, what in cuda:
            print(f"note: {where} ({what}) needs a CUDA GPU where it runs")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Show a run's stages and metrics (rich tables); --json prints metrics.json."""
    from mlsteps.errors import UserError
    from mlsteps.report import load_run, print_report, write_report

    STATE["json"] = as_json
    if not (run_dir / "state.json").exists():
        raise UserError(
            "not a run directory (no state.json)", where=str(run_dir), hint="pass runs/<name>"
        )
    if as_json:
        # metrics.json as the run has it, a lost stage's metrics filled in from its own record
        emit(load_run(run_dir)[1])
        return
    try:
        write_report(run_dir)
    except OSError as exc:  # a read-only run directory can still be shown
        print(f"warning: could not write report.md: {exc}", file=sys.stderr)
    print_report(run_dir)


cli_tools.register(app)
cli_stages.register(app)


def _is_usage_error(exc: BaseException) -> bool:
    """Click usage errors (typer vendors click, so match by shape rather than by class)."""
    return any(c.__name__ == "ClickException" for c in type(exc).__mro__) and hasattr(exc, "show")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes (0 ok, 1 stage failed, 2 usage, 130 stop)."""
    from mlsteps.errors import EXIT_INTERRUPTED, EXIT_USAGE, MlstepsError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="mlsteps", standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - map every error onto an exit code
        if _is_usage_error(exc):
            exc.show()  # type: ignore[attr-defined]
            if "--json" in args:
                message = exc.format_message()  # type: ignore[attr-defined]
                usage = {"message": message, "where": None, "hint": "see --help"}
                emit({"error": {**usage, "exit_code": EXIT_USAGE}, "exit_code": EXIT_USAGE})
            sys.exit(EXIT_USAGE)
        if debug:
            traceback.print_exc()
        error: dict[str, Any] = {"message": str(exc), "where": None, "hint": None}
        if isinstance(exc, MlstepsError):
            message, exit_code = str(exc), exc.exit_code
            error.update(message=exc.message, where=exc.where, hint=exc.hint)
        else:
            message, exit_code = f"internal error: {type(exc).__name__}: {exc}", 1
            if not debug:
                message += " (rerun with --debug for the traceback)"
            error["message"] = message
        print(f"error: {message}", file=sys.stderr)
        if STATE["json"] or "--json" in args:
            # Scripts parse stdout: a failure is a JSON object too, never silence.
            emit({"error": {**error, "exit_code": exit_code}, "exit_code": exit_code})
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)

"""The `mlsteps` command line (Typer).

Only typer is imported at module level: `--help` must stay instant, and `validate` must never
import torch/transformers/datasets/peft/accelerate/sacrebleu/rouge_score/nltk. Everything else is
imported inside the command bodies.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="mlsteps",
    help="Multi-step language-model training from one YAML recipe: tokenizer, pretrain, "
    "finetune, prompt learning, eval and predict, each stage handing its model to the next.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (shell detected on use)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Builtin data sets: list them or export them as jsonl.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

_STATE = {"debug": False, "json": False}

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")]


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
    _STATE["debug"] = debug
    if debug:
        os.environ["MLSTEPS_DEBUG"] = "1"  # engine.quiet keeps the libraries' messages
    if offline:
        from mlsteps.hub import set_offline

        set_offline()


def _emit(result: dict[str, Any]) -> None:
    """Strict JSON on stdout (a non-finite number becomes null with its reason next to it)."""
    from mlsteps.rundir import finite_json

    sys.stdout.write(json.dumps(finite_json(result), indent=2, default=str, allow_nan=False) + "\n")


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

    _STATE["json"] = as_json
    _run_dir_path(run_dir)  # an empty --run-dir is refused before the recipe is even read
    spec = load_recipe(recipe, overrides or [])
    from mlsteps.distributed import inside_launcher

    if nproc_per_node is not None and not inside_launcher():
        # Validate here (exit 2 before any process starts), then re-run this command on every
        # process through torchrun's engine.
        from mlsteps.distributed import LaunchOptions, launch

        check_data_files(spec)
        child = ["--debug"] if _STATE["debug"] else []
        child += ["run", str(recipe)]
        for flag, value in (("--run-dir", run_dir), ("--from", from_stage), ("--only", only)):
            if value is not None:
                child += [flag, str(value)]
        child += ["--force"] if force else []
        child += ["--json"] if as_json else []
        child += ["--", *(overrides or [])]
        opts = LaunchOptions(nproc_per_node, nnodes, node_rank, master_addr, master_port)
        raise typer.Exit(launch(opts, child))
    _execute(spec, run_dir, from_stage=from_stage, only=only, force=force, as_json=as_json)


def _run_dir_path(text: str | None) -> Path | None:
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


def _execute(spec: Any, run_dir: str | None, *, as_json: bool, **kwargs: Any) -> None:
    from mlsteps.distributed import is_main
    from mlsteps.runner import run_recipe

    target = _run_dir_path(run_dir) or Path("runs") / spec.name
    result = run_recipe(spec, target, **kwargs)
    if not is_main():
        return  # rank 0 reports for the whole run
    if as_json:
        _emit(result.to_json())
    else:
        done = sum(not s.get("skipped") for s in result.stages.values())
        print(
            f"done: {done} stage(s) run, {len(result.stages) - done} skipped; "
            f"report: {target / 'report.md'}",
            file=sys.stderr,
        )


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None, as_json: JsonOpt = False) -> None:
    """Validate a recipe fully without running anything (no torch import)."""
    from mlsteps.recipe import check_data_files, load_recipe
    from mlsteps.recipe.specs.loading import needs_cuda

    _STATE["json"] = as_json
    spec = load_recipe(recipe, overrides or [])
    check_data_files(spec)
    # Whether the machine that runs it has CUDA, validate cannot know (no torch import): it
    # names the settings that need it; `run` refuses them up front where CUDA is absent.
    cuda = [
        (f"stages.{n}.{key}", what) for n, s in spec.stages.items() for key, what in needs_cuda(s)
    ]
    if as_json:
        _emit(
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

    _STATE["json"] = as_json
    if not (run_dir / "state.json").exists():
        raise UserError(
            "not a run directory (no state.json)", where=str(run_dir), hint="pass runs/<name>"
        )
    if as_json:
        # metrics.json as the run has it, a lost stage's metrics filled in from its own record
        _emit(load_run(run_dir)[1])
        return
    try:
        write_report(run_dir)
    except OSError as exc:  # a read-only run directory can still be shown
        print(f"warning: could not write report.md: {exc}", file=sys.stderr)
    print_report(run_dir)


# --- mlsteps init: the packaged recipes (mlsteps/starters.py) ---------------------------------
@app.command()
def init(
    example: Annotated[
        str, typer.Argument(help="Packaged recipe to copy (see --list).")
    ] = "quickstart",
    directory: Annotated[
        Path, typer.Argument(help="Directory to write <EXAMPLE>.yaml into.")
    ] = Path("."),
    list_: Annotated[
        bool, typer.Option("--list", help="List the packaged recipes and exit.")
    ] = False,
) -> None:
    """Write a starter recipe (the quickstart, the alignment demo or an example) to edit."""
    from mlsteps import starters

    if list_:
        for name, path in starters.recipes().items():
            print(f"{name:32} {starters.summary(path)}")
        return
    target = starters.init(example, directory)
    print(f"wrote {target}; run it with: mlsteps run {target}", file=sys.stderr)


# --- end of mlsteps init ----------------------------------------------------------------------


@app.command()
def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the markdown reference.")
    ] = False,
) -> None:
    """Print the JSON Schema of recipes (or the recipe reference as markdown)."""
    if markdown:
        from mlsteps.recipe.reference import recipe_reference

        sys.stdout.write(recipe_reference())
        return
    from mlsteps.recipe import Recipe

    _emit(Recipe.model_json_schema(by_alias=True))


@app.command()
def score(
    predictions: Annotated[
        Path,
        typer.Argument(
            help="Generations: jsonl (its 'prediction' field) or text, one per line.",
            show_default=False,
        ),
    ],
    references: Annotated[
        list[Path],
        typer.Option(
            "--references",
            help="References, one per row: jsonl ('reference': a string or a list) or text. "
            "Repeat for several references per row.",
            show_default=False,
        ),
    ],
    metrics: Annotated[
        list[str],
        typer.Option(
            "--metrics",
            help="Comma-separated: bleu, chrf, ter, rouge, exact_match, token_f1, accuracy, f1.",
            show_default=False,
        ),
    ],
    target_lang: Annotated[
        str | None,
        typer.Option("--target-lang", help="Language of the references (BLEU/TER/ROUGE tokens)."),
    ] = None,
    prediction_field: Annotated[
        str, typer.Option("--prediction-field", help="jsonl field of the predictions.")
    ] = "prediction",
    reference_field: Annotated[
        str, typer.Option("--reference-field", help="jsonl field of the references.")
    ] = "reference",
    as_json: JsonOpt = False,
) -> None:
    """Score generations made elsewhere with the eval stage's metric code (no torch)."""
    from mlsteps.score import score_files

    _STATE["json"] = as_json
    result = score_files(
        predictions,
        references,
        metrics,
        target_lang=target_lang,
        prediction_field=prediction_field,
        reference_field=reference_field,
    )
    if as_json:
        _emit(result)
        return
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@data_app.command("list")
def data_list(as_json: JsonOpt = False) -> None:
    """List the builtin data sets."""
    from dataclasses import asdict

    from mlsteps.builtin import list_builtin

    infos = list_builtin()
    if as_json:
        _emit({"datasets": [asdict(i) for i in infos]})
        return
    for info in infos:
        sizes = ", ".join(f"{k} {v}" for k, v in info.split_sizes.items())
        print(f"{info.name:18} {info.description} [columns: {', '.join(info.columns)}; {sizes}]")


@data_app.command("export")
def data_export(
    name: Annotated[str, typer.Argument(help="Builtin data set, e.g. toy/translate.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write <split>.jsonl into.")],
) -> None:
    """Write a builtin data set as one jsonl file per split."""
    from mlsteps.builtin import export_builtin

    for path in export_builtin(name, out_dir):
        print(path)


# --- mlsteps cache ls|clear: the packed-data cache (mlsteps.cache) -------------------------------
cache_app = typer.Typer(
    help="The packed pretraining data cache ($MLSTEPS_CACHE, default ~/.cache/mlsteps): "
    "list or clear the entries mlsteps wrote.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(as_json: JsonOpt = False) -> None:
    """List the packed corpora in the cache (key, blocks, tokens, size, what)."""
    from mlsteps import cache

    found = cache.entries()
    rows = [
        {
            "key": e.path.name,
            "path": str(e.path),
            "what": e.manifest.get("what", ""),
            "blocks": e.manifest.get("n_blocks"),
            "block_len": e.manifest.get("block_len"),
            "tokens": e.manifest.get("n_tokens"),
            "bytes": e.size_bytes,
        }
        for e in found
    ]
    if as_json:
        _emit({"root": str(cache.cache_root()), "entries": rows})
        return
    print(f"cache: {cache.cache_root()} ({len(rows)} entries)")
    for r in rows:
        print(
            f"{r['key']}  {r['what']:15} {r['blocks']:>10,} blocks x {r['block_len']:<5} "
            f"{r['tokens']:>13,} tokens  {cache.human_bytes(r['bytes'])}"
        )


@cache_app.command("clear")
def cache_clear(as_json: JsonOpt = False) -> None:
    """Remove every entry mlsteps wrote (and abandoned partial ones); nothing else is touched."""
    from mlsteps import cache

    count, size = cache.clear()
    if as_json:
        _emit({"root": str(cache.cache_root()), "removed": count, "bytes": size})
        return
    print(f"removed {count} entries ({cache.human_bytes(size)}) from {cache.cache_root()}")


# --- end of mlsteps cache ------------------------------------------------------------------------


def _stage_command(kind: str, summary: str) -> None:
    def command(
        overrides: Annotated[
            list[str] | None,
            typer.Argument(
                help="Stage fields as KEY=VALUE, e.g. train.max_steps=50.", show_default=False
            ),
        ] = None,
        config: Annotated[
            Path | None, typer.Option("--config", help="Stage spec YAML file.")
        ] = None,
        name: Annotated[
            str,
            typer.Option(help="Run name: the stage writes to runs/<name>/<command>/."),
        ] = kind,
        run_dir: Annotated[
            str | None, typer.Option(help="Run directory (default runs/<name>).")
        ] = None,
        source: Annotated[
            str | None,
            typer.Option(
                "--model",
                "--from",
                help="Model source: a local directory or hub id (--from is the same option; "
                "in `run`, --from/--from-stage names a stage to re-run from).",
            ),
        ] = None,
        data: Annotated[
            list[str] | None, typer.Option(help="Data file(s)/glob(s) or builtin:NAME.")
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed.")] = 42,
        force: Annotated[
            bool, typer.Option(help="Re-run even if an identical result exists.")
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        from mlsteps.recipe import apply_overrides, validate_recipe
        from mlsteps.recipe.yamlio import LoadedYaml, load_yaml_file

        _STATE["json"] = as_json
        _run_dir_path(run_dir)
        stage: dict[str, Any] = {}
        source_name = f"mlsteps {kind}"
        doc = None
        if config is not None:
            doc = load_yaml_file(config)
            source_name = str(config)
            if not isinstance(doc.data, dict):
                from mlsteps.errors import UserError

                raise UserError(
                    "a stage config must be a mapping of stage fields", where=str(config)
                )
            stage = dict(doc.data)
        stage["kind"] = kind
        if source is not None:
            stage["model" if kind == "predict" else "models" if kind == "eval" else "from"] = (
                [source] if kind == "eval" else source
            )
        if data:
            stage["data"] = {"files": data} if not data[0].startswith("builtin:") else data[0]
        # The stage is named by its kind, the run by --name: runs/<name>/<kind>/.
        raw = {"name": name, "seed": seed, "stages": {kind: stage}}
        full = [
            f"stages.{kind}.{o}" if not o.startswith("~") else f"~stages.{kind}.{o[1:]}"
            for o in overrides or []
        ]
        raw = apply_overrides(raw, full)
        if doc is not None:
            # The config file holds one stage's fields: re-root its line numbers under
            # stages.NAME so that errors name config.yaml:LINE.
            doc = LoadedYaml(
                data=raw,
                source=doc.source,
                lines={f"stages.{kind}.{k}": v for k, v in doc.lines.items()},
                raw_scalars={f"stages.{kind}.{k}": v for k, v in doc.raw_scalars.items()},
            )
        spec = validate_recipe(raw, doc, source_name, full, override_prefix=f"stages.{kind}.")
        _execute(spec, run_dir, as_json=as_json, force=force)

    command.__doc__ = f"{summary} (one-stage recipe; same code path as `run`)."
    app.command(name=kind)(command)


for _kind, _summary in (
    ("tokenizer", "Train a tokenizer or wrap an existing one"),
    ("pretrain", "Pretrain a causal-LM or masked-LM model"),
    ("finetune", "Fine-tune for classification, seq2seq or instruction SFT (full or LoRA)"),
    ("prompt", "Prompt learning: zero/few-shot templates or soft prompt tuning"),
    ("eval", "Evaluate models: perplexity, BLEU/chrF/TER, ROUGE, accuracy/F1, exact match"),
    ("predict", "Generate predictions for a data set"),
):
    _stage_command(_kind, _summary)


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
                _emit({"error": {**usage, "exit_code": EXIT_USAGE}, "exit_code": EXIT_USAGE})
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
        if _STATE["json"] or "--json" in args:
            # Scripts parse stdout: a failure is a JSON object too, never silence.
            _emit({"error": {**error, "exit_code": exit_code}, "exit_code": exit_code})
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)

"""The one-stage commands (`mlsteps pretrain`, `mlsteps finetune`, ...): a recipe of one stage
built from options, a stage config file and KEY=VALUE overrides, run through the same code path
as `mlsteps run`. Registered on the app by cli.py (``register``); typer only at module level.
"""

from pathlib import Path
from typing import Annotated, Any

import typer

from mlsteps.cli_common import STATE, JsonOpt, execute, run_dir_path

STAGE_COMMANDS = (
    ("tokenizer", "Train a tokenizer or wrap an existing one"),
    ("pretrain", "Pretrain a causal-LM or masked-LM model"),
    ("finetune", "Fine-tune for classification, seq2seq or instruction SFT (full or LoRA)"),
    ("prompt", "Prompt learning: zero/few-shot templates or soft prompt tuning"),
    ("eval", "Evaluate models: perplexity, BLEU/chrF/TER, ROUGE, accuracy/F1, exact match"),
    ("predict", "Generate predictions for a data set"),
)


def register(app: typer.Typer) -> None:
    """Add one command per stage kind to ``app``."""
    for kind, summary in STAGE_COMMANDS:
        _stage_command(app, kind, summary)


def _stage_command(app: typer.Typer, kind: str, summary: str) -> None:
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
        STATE["json"] = as_json
        run_dir_path(run_dir)
        spec = one_stage_recipe(
            kind, overrides, config=config, name=name, source=source, data=data, seed=seed
        )
        execute(spec, run_dir, as_json=as_json, force=force)

    command.__doc__ = f"{summary} (one-stage recipe; same code path as `run`)."
    app.command(name=kind)(command)


def one_stage_recipe(
    kind: str,
    overrides: list[str] | None,
    *,
    config: Path | None,
    name: str,
    source: str | None,
    data: list[str] | None,
    seed: int,
) -> Any:
    """The validated recipe of one stage named ``kind`` in run ``name``: the config file's
    fields, then --model/--data, then the overrides (as ``stages.<kind>.KEY=VALUE``)."""
    from mlsteps.recipe import apply_overrides, validate_recipe
    from mlsteps.recipe.yamlio import LoadedYaml, load_yaml_file

    stage: dict[str, Any] = {}
    source_name = f"mlsteps {kind}"
    doc = None
    if config is not None:
        doc = load_yaml_file(config)
        source_name = str(config)
        if not isinstance(doc.data, dict):
            from mlsteps.errors import UserError

            raise UserError("a stage config must be a mapping of stage fields", where=str(config))
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
    return validate_recipe(raw, doc, source_name, full, override_prefix=f"stages.{kind}.")

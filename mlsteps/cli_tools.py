"""The `mlsteps` commands around recipes: init, schema, score, data list|export, cache ls|clear.

Registered on the app by cli.py (``register``). typer only at module level: everything else is
imported inside the command bodies, so `--help` stays instant and torch-free.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from mlsteps.cli_common import STATE, JsonOpt, emit

data_app = typer.Typer(
    help="Builtin data sets: list them or export them as jsonl.", no_args_is_help=True
)
cache_app = typer.Typer(
    help="The packed pretraining data cache ($MLSTEPS_CACHE, default ~/.cache/mlsteps): "
    "list or clear the entries mlsteps wrote.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add these commands to ``app`` (in the order `mlsteps --help` lists them)."""
    app.add_typer(data_app, name="data")
    app.command()(init)
    app.command()(schema)
    app.command()(score)
    app.add_typer(cache_app, name="cache")


# --- mlsteps init: the packaged recipes (mlsteps/starters.py) ---------------------------------
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

    emit(Recipe.model_json_schema(by_alias=True))


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

    STATE["json"] = as_json
    result = score_files(
        predictions,
        references,
        metrics,
        target_lang=target_lang,
        prediction_field=prediction_field,
        reference_field=reference_field,
    )
    if as_json:
        emit(result)
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
        emit({"datasets": [asdict(i) for i in infos]})
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
        emit({"root": str(cache.cache_root()), "entries": rows})
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
        emit({"root": str(cache.cache_root()), "removed": count, "bytes": size})
        return
    print(f"removed {count} entries ({cache.human_bytes(size)}) from {cache.cache_root()}")


# --- end of mlsteps cache ------------------------------------------------------------------------

"""Render the recipe reference (docs/recipe-reference.md) from the pydantic models.

The field descriptions are the single source: `mlsteps schema` prints them as JSON Schema and
`mlsteps schema --markdown` as this reference; a test keeps the committed file current.
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mlsteps.recipe.specs import SPEC_BY_KIND
from mlsteps.recipe.specs.base import INT64_MAX, Strict
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.distributed import DeepSpeedSpec, DistributedSpec, FsdpSpec
from mlsteps.recipe.specs.evaluate import LmEvalSpec, PerplexitySpec
from mlsteps.recipe.specs.loading import QuantizationSpec
from mlsteps.recipe.specs.model import ArchSpec, GenerationSpec, LoraSpec
from mlsteps.recipe.specs.train import TrainSpec


def _bound(value: Any) -> str:
    """Bounds as people write them: 2**32-1, not 4294967295."""
    for power in (32, 63):
        if value == 2**power - 1:
            return f"2**{power}-1"
    return str(value)


def _type_name(annotation: Any) -> str:
    """A short, readable type: 'int > 0', 'str | None', "'a' | 'b'", 'list[str]'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        base = _type_name(args[0])
        bounds = [
            f"{op} {_bound(getattr(m, attr))}"
            for m in args[1:]
            for op, attr in ((">", "gt"), (">=", "ge"), ("<", "lt"), ("<=", "le"))
            if getattr(m, attr, None) not in (None, INT64_MAX)
        ]
        for m in args[1:]:
            for sub in getattr(m, "metadata", []):
                bounds += [
                    f"{op} {_bound(getattr(sub, attr))}"
                    for op, attr in ((">", "gt"), (">=", "ge"), ("<", "lt"), ("<=", "le"))
                    if getattr(sub, attr, None) not in (None, INT64_MAX)
                ]
        return f"{base} ({', '.join(bounds)})" if bounds else base
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (Union, UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation.__name__.endswith("Spec") and annotation in SPEC_BY_KIND.values():
            return "stage"
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        return "see below" if isinstance(info.default_factory, type) else "*(factory)*"
    if info.default is PydanticUndefined:
        return ""
    return f"`{json.dumps(info.default)}`"


def model_table(model: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        key = info.alias or name
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        typ = _type_name(info.annotation)
        if info.metadata:
            typ = _type_name(Annotated[(info.annotation, *info.metadata)])
        if model.__name__ == "Recipe" and name == "stages":
            typ = "mapping: stage name -> stage (chosen by `kind`)"
        rows.append(f"| `{key}` | {typ} | {_default(info)} | {desc} |")
    return "\n".join(rows)


def recipe_reference() -> str:
    """The whole recipe reference as markdown."""
    from mlsteps.recipe import Recipe

    parts = [
        "# Recipe reference",
        "",
        "Generated from the recipe models by `mlsteps schema --markdown`; do not edit by hand.",
        "",
        "Values are strict: an `int` is a whole number up to 2**63-1 (`1e3` counts, `2.5` does "
        "not), a `float` is finite (`.inf` and `.nan` are refused), `true`/`false` (and YAML's "
        "`yes`/`no`/`on`/`off`) are never numbers, and a `bool` is only `true` or `false`. A "
        "field that does nothing under the other fields' values (`lora` with `method: full`, "
        "`mlm_probability` with `objective: clm`) is refused unless it holds its default or "
        "came from `defaults`.",
        "",
        "## Recipe",
        "",
        model_table(Recipe),
        "",
    ]
    for kind, model in SPEC_BY_KIND.items():
        parts += [
            f"## Stage kind `{kind}`",
            "",
            (model.__doc__ or "").strip(),
            "",
            model_table(model),
            "",
        ]
    shared: list[type[Strict]] = [DataSpec, TrainSpec, ArchSpec, LoraSpec, QuantizationSpec]
    shared += [GenerationSpec, PerplexitySpec, LmEvalSpec, DistributedSpec, FsdpSpec, DeepSpeedSpec]
    for model in shared:
        doc = " ".join((model.__doc__ or "").split())
        parts += [f"## {model.__name__}", "", doc, "", model_table(model), ""]
    return "\n".join(parts).rstrip() + "\n"

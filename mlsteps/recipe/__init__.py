"""Recipes: loading, defaults, overrides, validation and the messages users see.

Nothing here imports torch or the HF stack: `mlsteps validate` must stay instant.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

# the module, not its function: stage_kinds imports recipe.specs, which runs this __init__ first,
# so when stage_kinds is the first module imported it is still half-built here
from mlsteps import stage_kinds
from mlsteps.errors import UserError, did_you_mean
from mlsteps.recipe.data_checks import check_data_files, data_specs, streamed_keys
from mlsteps.recipe.errors import field_keys, format_error, short
from mlsteps.recipe.specs import SPEC_BY_KIND, StageSpec, _build
from mlsteps.recipe.specs.base import SAFE_NAME_RE, STAGE_NAME_RE, Seed, Strict
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.distributed import DistributedSpec
from mlsteps.recipe.yamlio import LoadedYaml, load_yaml_file, parse_scalar

# Files at the top of a run directory; a stage directory of the same name would clobber them.
__all__ = [
    "Recipe", "apply_defaults", "apply_overrides", "check_data_files", "check_references",
    "data_specs", "load_recipe", "validate_recipe",
]  # fmt: skip

RESERVED_NAMES = frozenset({"state.json", "metrics.json", "report.md", "env.json", "recipe.yaml"})


_build.off()  # see mlsteps.recipe.specs._build


class Recipe(Strict):
    """A multi-step training recipe: named stages run in order, each handing its model on."""

    name: str = Field(..., description="Run name; the run directory defaults to runs/<name>.")
    seed: Seed = Field(42, description="Global seed for data order, initialisation and sampling.")
    description: str | None = Field(None, description="Free text shown in the report.")
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings deep-merged into every stage that has those fields, "
        "e.g. {train: {batch_size: 16}}.",
    )
    stages: dict[str, StageSpec] = Field(
        ..., description="Ordered mapping: stage name -> stage spec (runs in this order)."
    )
    distributed: DistributedSpec | None = Field(
        None,
        description="Multi-process settings (backend, timeout, FSDP or DeepSpeed); used only when "
        "launched on several processes (mlsteps run --nproc-per-node N, torchrun, accelerate "
        "launch). See docs/distributed.md.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME_RE.match(value):
            raise ValueError(
                f"run name '{value}' must be one path component of letters, digits, '_', '-', '.'"
            )
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("a recipe needs at least one stage")
        for name in value:
            problem = stage_name_problem(name)
            if problem:
                raise ValueError(problem)
        return value

    def resolved_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults applied) as plain data, using YAML key names."""
        return self.model_dump(mode="json", by_alias=True, exclude={"defaults"})


_build.done()


def stage_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a stage name, or None. A stage name is a directory of the run and
    the second part of every override key (stages.NAME.key): one path component, no dots."""
    if name in RESERVED_NAMES:
        return f"stage name '{name}' is reserved for the run directory's own files"
    if not STAGE_NAME_RE.match(name):
        return (
            f"stage name '{name}' must be one path component of at most 64 letters, digits, '_' "
            "and '-', starting with a letter or digit (no '.': overrides address stages.NAME.key)"
        )
    return None


def _check_stage_names(raw: dict[str, Any], doc: LoadedYaml | None, source: str) -> None:
    """Stage-name errors at the line of the stage (the validator above only knows 'stages')."""
    stages = raw.get("stages")
    for name in stages if isinstance(stages, dict) else ():
        problem = stage_name_problem(name)
        if problem:
            path = f"stages.{name}"
            where = doc.where(path) if doc else f"{source} ({path})"
            raise UserError(problem, where=where, hint="rename the stage, e.g. 'pretrain_2'")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge `defaults` into every stage whose kind has the key; the stage's own values win."""
    defaults = raw.get("defaults") or {}
    stages = raw.get("stages")
    if not isinstance(defaults, dict) or not isinstance(stages, dict):
        return raw
    all_keys = set().union(*(field_keys(m) for m in SPEC_BY_KIND.values()))
    for key in defaults:
        if key not in all_keys or key == "kind":
            hint = did_you_mean(key, all_keys - {"kind"}) or "defaults hold stage fields"
            raise UserError(f"unknown key '{key}' in defaults", where=f"defaults.{key}", hint=hint)
    out = dict(raw)
    out["stages"] = {}
    for name, stage in stages.items():
        spec_cls = SPEC_BY_KIND.get(str(stage.get("kind"))) if isinstance(stage, dict) else None
        if spec_cls is None:
            out["stages"][name] = stage
            continue
        keys = field_keys(spec_cls)
        applicable = {k: v for k, v in defaults.items() if k in keys}
        out["stages"][name] = _deep_merge(applicable, stage)
    return out


_DATA_KEYS = ("data", "validation")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=VALUE` (VALUE parsed as YAML) and `~a.b.c` (remove) to the raw recipe."""
    out = copy.deepcopy(raw)
    for item in overrides:
        remove = item.startswith("~")
        if remove:
            key, value = item[1:], None
        elif "=" in item:
            key, text = item.split("=", 1)
            value = parse_scalar(text, where=f"override '{short(item)}'")
        else:
            raise UserError(
                f"override '{item}' is not KEY=VALUE or ~KEY",
                hint="e.g. stages.pretrain.train.max_steps=50",
            )
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"override '{item}' has an empty key")
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            if (
                isinstance(node, dict)
                and isinstance(node.get(part), str | list)
                and part in _DATA_KEYS
            ):
                # Reaching below a data shorthand ('builtin:x', 'file.txt'): use its mapping form.
                node[part] = DataSpec.model_validate(node[part]).model_dump(exclude_defaults=True)
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{'.'.join(parts[:depth])}' is not a mapping")
            if remove and part not in node:
                raise UserError(f"override '{item}': nothing at '{key}' to remove")
            node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            if remove:
                node.pop(int(last))
            else:
                node[int(last)] = value
        elif isinstance(node, dict):
            if remove:
                if last not in node:
                    raise UserError(f"override '{item}': nothing at '{key}' to remove")
                del node[last]
            else:
                node[last] = value
        else:
            raise UserError(f"override '{item}': parent of '{last}' is not a mapping")
    return out


def check_references(recipe: Recipe, doc: LoadedYaml | None = None) -> None:
    """A stage may only refer to earlier stages; misspelled stage names get a suggestion."""
    names = list(recipe.stages)
    for index, (stage_name, spec) in enumerate(recipe.stages.items()):
        earlier = names[:index]
        for field_name in getattr(spec, "REF_FIELDS", ()):
            value = getattr(spec, field_name)
            refs = value if isinstance(value, list) else [value]
            key = type(spec).model_fields[field_name].alias or field_name
            for i, ref in enumerate(refs):
                if ref is None:
                    continue
                path = f"stages.{stage_name}.{key}" + (f".{i}" if isinstance(value, list) else "")
                where = doc.where(path) if doc else path
                if ref == stage_name:
                    raise UserError(f"stage '{stage_name}' refers to itself", where=where)
                if ref in names[index + 1 :]:
                    raise UserError(
                        f"'{ref}' is a later stage; a stage can only use earlier stages",
                        where=where,
                        hint=f"move '{ref}' before '{stage_name}'",
                    )
                if ref in earlier or Path(ref).expanduser().is_dir():
                    continue
                if ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists():
                    raise UserError(
                        f"model directory '{ref}' not found",
                        where=where,
                        hint="check the path, or name an earlier stage or a hub id",
                    )
                if "/" in ref:
                    continue  # a hub id 'org/name'; it is checked when the stage loads it
                # Not a stage, not a path, no namespace: a hub id like 'gpt2' or a typo.
                suggestion = did_you_mean(ref, earlier)
                if suggestion:
                    raise UserError(f"unknown stage '{ref}'", where=where, hint=suggestion)


def _paths(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key path in nested mappings."""
    out: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out |= {path} | _paths(value, path)
    return out


def _defaults_only(raw: dict[str, Any], merged: dict[str, Any]) -> dict[str, set[str]]:
    """Stage name -> the key paths that only ``defaults`` put into it."""
    own, full = raw.get("stages"), merged.get("stages")
    if not isinstance(own, dict) or not isinstance(full, dict):
        return {}  # not a mapping of stages: validation names that error
    return {name: _paths(stage) - _paths(own.get(name)) for name, stage in full.items()}


def check_field_rules(
    recipe: Recipe,
    raw: dict[str, Any],
    doc: LoadedYaml | None = None,
    source: str = "<recipe>",
    removal_prefix: str | None = None,
) -> None:
    """Refuse a value that cannot work given the other fields (``Strict._invalid``), then a
    field the recipe wrote that does nothing under the other fields' values (``lora`` with
    method full, ``mlm_probability`` with objective clm ...). Fields that only ``defaults`` put
    into a stage are exempt from the second: defaults go to every stage that has the field.
    With ``removal_prefix`` (overrides were given) the fix also names the ``~KEY`` override that
    removes the field, ``removal_prefix`` cut from its start."""
    from_defaults = _defaults_only(raw, apply_defaults(raw))

    def where(name: str, key: str) -> str:
        path = f"stages.{name}.{key}"
        if doc is None:
            return f"{source} ({path})"
        if key in from_defaults.get(name, set()):
            return doc.where(f"defaults.{key}")[:-1] + f", merged into stages.{name})"
        return doc.where(path)

    for name, spec in recipe.stages.items():
        for key, what, fix in spec.invalid_fields()[:1]:
            raise UserError(what, where=where(name, key), hint=fix)
        if spec.kind != "pretrain":  # only pretraining packs its text shard by shard
            for key in streamed_keys(spec)[:1]:
                what = f"streaming: true is for a pretrain stage's data, not {spec.kind}"
                raise UserError(what, where=where(name, key), hint="remove streaming")
    found = [
        (f"stages.{name}.{key}", where(name, key), why, fix)
        for name, spec in recipe.stages.items()
        for key, why, fix in spec.ignored_fields()
        if key not in from_defaults.get(name, set())
    ]
    if recipe.distributed is not None:
        for key, why, fix in recipe.distributed.ignored_fields():
            path = f"distributed.{key}"
            found.append((path, doc.where(path) if doc else f"{source} ({path})", why, fix))
    for path, place, why, fix in found[:1]:
        if removal_prefix is not None:
            fix += f"; on the command line: ~{path.removeprefix(removal_prefix)}"
        raise UserError(f"'{path.rpartition('.')[2]}' does nothing: {why}", where=place, hint=fix)


def validate_recipe(
    raw: Any,
    doc: LoadedYaml | None = None,
    source: str = "<recipe>",
    overrides: list[str] | None = None,
    override_prefix: str = "",
) -> Recipe:
    """Validate raw recipe data; raise UserError naming file:line and the dotted key path.
    ``overrides`` (already applied to ``raw``; typed by the user without ``override_prefix``)
    only improve the messages."""
    if not isinstance(raw, dict):
        kind = "a list" if isinstance(raw, list) else type(raw).__name__
        raise UserError(
            f"a recipe must be a mapping with 'name' and 'stages', not {kind}", where=source
        )
    _check_stage_names(raw, doc, source)
    merged = apply_defaults(raw)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        given = _defaults_only(raw, merged)
        raise format_error(errors[0], doc, source, Recipe, overrides or [], given) from None
    check_references(recipe, doc)
    check_field_rules(recipe, raw, doc, source, override_prefix if overrides else None)
    stage_kinds.check_kinds(recipe, doc)
    return recipe


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file (or a packaged recipe named bare, as in
    `mlsteps run quickstart`). Raises UserError; never imports torch."""
    from mlsteps.starters import resolve

    path = resolve(path)
    doc = load_yaml_file(path)
    raw = doc.data
    if overrides:
        if not isinstance(raw, dict):
            raise UserError("a recipe must be a mapping with 'name' and 'stages'", where=str(path))
        raw = apply_overrides(raw, overrides)
    return validate_recipe(raw, doc, str(path), overrides)

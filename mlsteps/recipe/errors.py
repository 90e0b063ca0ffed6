"""Turn pydantic validation errors into the one-line messages users see: file:line, the dotted
key as written, what is wrong and how to fix it ("did you mean", "quote it")."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from mlsteps.errors import UserError, did_you_mean
from mlsteps.recipe.specs import SPEC_BY_KIND
from mlsteps.recipe.yamlio import LoadedYaml, parse_scalar


def short(text: str, limit: int = 80) -> str:
    """An override as quoted in a message: a 10,000-character value would drown the line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_keys(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """Walk the recipe model along a pydantic error location to the model holding its last key."""
    model: Any = root
    i = 0
    while i < len(loc) - 1 and model is not None:
        part = loc[i]
        if model is root and part == "stages":
            kind = loc[i + 2] if i + 2 < len(loc) else None
            model = SPEC_BY_KIND.get(str(kind))
            i += 3
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        fields.update(model.model_fields)
        f = fields.get(part)
        if f is None:
            return None
        ann = f.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        i += 1
    return model if isinstance(model, type) else None


_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "none"})


def _dotted(loc: tuple[Any, ...]) -> str:
    """Turn a pydantic location into the recipe's dotted path (drop the union tag)."""
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in SPEC_BY_KIND:
        parts.pop(2)
    # Validators named like 'function-after[...]' are pydantic internals, not recipe keys; so is
    # the member type a union error ends with (text_column: str | list[str] -> '.str').
    parts = [p for p in parts if "[" not in p]
    if len(parts) > 1 and parts[-1] in _UNION_MEMBERS:
        parts.pop()
    return ".".join(parts)


def _as_written(path: str, raw: Any) -> str:
    """Drop list indexes the recipe did not write: a single data source is validated as a list
    of one (``data.0.split``), but the user wrote ``data.split``."""
    kept: list[str] = []
    node = raw
    for part in path.split(".") if path else []:
        if part.isdigit() and not isinstance(node, list):
            continue
        kept.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = None
    return ".".join(kept)


def _collection_override(path: str, overrides: list[str]) -> str | None:
    """The override KEY=VALUE that set ``path`` to a mapping or list, if one did: YAML reads
    'a: b' as a mapping and '[x]' as a list, where the user usually meant text."""
    for item in reversed(overrides):
        key, eq, text = item.partition("=")
        if eq and ".".join(p for p in key.strip().split(".") if p) == path:
            value = parse_scalar(text, where=f"override '{short(item)}'")
            return item if isinstance(value, dict | list) else None
    return None


# A bound or finiteness check failed on a number: "quote it if you meant text" would mislead.
_NUMBER_CHECKS = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
)


def format_error(
    err: Any,
    doc: LoadedYaml | None,
    source: str,
    root: type[BaseModel],
    overrides: list[str] | None = None,
    from_defaults: dict[str, set[str]] | None = None,
) -> UserError:
    """One pydantic error as a UserError: file:line (dotted.key), what, and the fix. A value
    that ``defaults`` put into a stage (``from_defaults``: stage -> key paths) is named at its
    line in ``defaults``."""
    loc = tuple(err["loc"])
    path = _dotted(loc)
    if doc is not None:
        path = _as_written(path, doc.data)
    where = doc.where(path) if doc else (f"{source} ({path})" if path else source)
    written = path  # where the value was written: the stage, or defaults
    parts = path.split(".", 2)
    if doc is not None and len(parts) == 3 and parts[0] == "stages":
        if parts[2] in (from_defaults or {}).get(parts[1], ()):
            written = f"defaults.{parts[2]}"
            where = doc.where(written)[:-1] + f", merged into stages.{parts[1]})"
    etype = err["type"]
    value = err.get("input")
    if etype == "extra_forbidden":
        model = _model_at(loc, root)
        key = path.rpartition(".")[2]
        hint = did_you_mean(key, field_keys(model)) if model else None
        if model and not hint:
            hint = f"valid keys: {', '.join(sorted(field_keys(model)))}"
        return UserError(f"unknown key '{key}'", where=where, hint=hint)
    if etype == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        hint = did_you_mean(str(tag), SPEC_BY_KIND) or f"kinds: {', '.join(SPEC_BY_KIND)}"
        kind_path = f"{path}.kind"
        kind_where = doc.where(kind_path) if doc else f"{source} ({kind_path})"
        return UserError(f"unknown stage kind '{tag}'", where=kind_where, hint=hint)
    if etype == "union_tag_not_found":
        return UserError(
            "stage has no 'kind'", where=where, hint=f"add kind: one of {', '.join(SPEC_BY_KIND)}"
        )
    if etype == "missing":
        return UserError(f"missing required key '{path.rpartition('.')[2]}'", where=where)
    msg = err["msg"].removeprefix("Value error, ")
    hint = None
    raw = doc.raw_scalars.get(written) if doc else None
    override = _collection_override(path, overrides or [])
    if etype == "bool_not_number":
        said = f"'{raw}'" if raw is not None else json.dumps(value)
        return UserError(
            f"expected a number, got {said} (a boolean in YAML)",
            where=where,
            hint="write a number; YAML reads true/false/yes/no/on/off as booleans",
        )
    if override is not None:
        key, _, text = override.partition("=")
        kind = "mapping" if isinstance(value, dict) else "list"
        text_wanted = etype == "string_type"
        return UserError(
            f"{msg}: the override '{override}' was read as a YAML {kind}",
            where=where,
            hint=f"quote the value for text, in the shell \"{key}='{text}'\""
            if text_wanted
            else "give a single value (YAML reads 'a: b' as a mapping and '[a]' as a list)",
        )
    if raw is not None and etype not in _NUMBER_CHECKS:
        hint = f"YAML read '{raw}' as {json.dumps(value)}; quote it (\"{raw}\") if you meant text"
    elif etype not in ("value_error", "assertion_error") and value is not None:
        msg = f"{msg}, got {json.dumps(value, default=str)[:80]}"
    return UserError(msg, where=where, hint=hint)

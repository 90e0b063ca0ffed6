"""Strict YAML loading: safe_load semantics, plus line numbers, no duplicate keys, no tags.

Plain ``yaml.safe_load`` follows YAML 1.1, which leaves ``1e-5`` a string and reads ``010`` as
octal 8. We keep safe_load's types but read exponent floats as floats and refuse leading-zero
integers, duplicate keys and every explicit tag (``!!python/object`` and friends).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlsteps.errors import UserError

# YAML 1.1 floats need a dot; accept '1e-5', '5E+3' as floats like YAML 1.2 does.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
# '010' is octal 8 in YAML 1.1 and 10 in YAML 1.2: ambiguous, so refuse it.
_LEADING_ZERO_INT = re.compile(r"^[-+]?0[0-9_]+$")
_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false"}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2-style exponent floats."""


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


@dataclass
class LoadedYaml:
    """A parsed document with the source line of every dotted key path."""

    data: Any
    source: str
    lines: dict[str, int] = field(default_factory=dict)
    # Raw text of plain scalars whose YAML 1.1 type is probably a surprise (no -> False, 3.10 -> 3.1).
    raw_scalars: dict[str, str] = field(default_factory=dict)
    node_count: int = 0

    def where(self, path: str) -> str:
        """'file:line (path)' for a dotted path, falling back to the closest known parent."""
        probe = path
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        loc = f"{self.source}:{line}" if line else self.source
        return f"{loc} ({path})" if path else loc


def _mark(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


# Aliases can expand exponentially ("billion laughs"); no real recipe comes near this.
MAX_NODES = 200_000
# PyYAML composes (and we convert) nested nodes recursively: 5,000 nested '[' would end in a
# RecursionError (so would 600 aliases each nesting the last). No recipe nests beyond a handful
# of levels.
MAX_DEPTH = 50


def _convert_mapping(
    node: yaml.MappingNode, loader: _StrictLoader, path: str, out: LoadedYaml, depth: int
) -> dict[str, Any]:
    """A mapping's keys checked (plain names, no merge keys, no duplicates) and its values
    converted, each key's line recorded."""
    result: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise UserError(
                f"complex mapping key at {_mark(key_node)}",
                where=out.source,
                hint="use plain string keys",
            )
        # '<<' resolves to the merge tag, which has no constructor: catch it before constructing.
        if key_node.tag == "tag:yaml.org,2002:merge" or key_node.value == "<<":
            raise UserError(
                f"merge keys '<<' are not supported ({_mark(key_node)})",
                where=out.source,
                hint="write the keys out, or use the recipe's 'defaults' block",
            )
        raw_key = loader.construct_object(key_node)
        if raw_key is None or isinstance(raw_key, bool):
            # str() would turn 'null:' into a key 'None' and 'yes:' into 'True'.
            text = key_node.value or "(empty)"
            line = key_node.start_mark.line + 1
            raise UserError(
                f"key '{text}' is "
                + ("null" if raw_key is None else f"the boolean {str(raw_key).lower()}")
                + " in YAML, not a name",
                where=f"{out.source}:{line}" + (f" ({path})" if path else ""),
                hint=f"quote it ('{key_node.value}') or rename it"
                if key_node.value
                else "give the key a name",
            )
        key = str(raw_key)
        child = f"{path}.{key}" if path else key
        if key in result:
            first = out.lines.get(child)
            raise UserError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1}"
                + (f" (first defined at line {first})" if first else ""),
                where=f"{out.source} ({child})",
                hint="remove one of them",
            )
        out.lines[child] = key_node.start_mark.line + 1
        result[key] = _convert(value_node, loader, child, out, depth + 1)
    return result


def _convert(
    node: yaml.Node, loader: _StrictLoader, path: str, out: LoadedYaml, depth: int = 0
) -> Any:
    out.node_count += 1
    if depth > MAX_DEPTH:  # only aliases get here: _prescan bounds the written nesting
        raise UserError(
            f"nested deeper than {MAX_DEPTH} levels through aliases",
            where=f"{out.source}:{node.start_mark.line + 1}" + (f" ({path})" if path else ""),
            hint="remove the nested aliases",
        )
    if out.node_count > MAX_NODES:
        raise UserError(
            f"document expands to more than {MAX_NODES} values (alias bomb?)",
            where=out.source,
            hint="remove the repeated aliases",
        )
    if isinstance(node, yaml.MappingNode):
        return _convert_mapping(node, loader, path, out, depth)
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = f"{path}.{i}" if path else str(i)
            out.lines[child] = item.start_mark.line + 1
            items.append(_convert(item, loader, child, out, depth + 1))
        return items
    assert isinstance(node, yaml.ScalarNode)
    if node.style is None:  # plain (unquoted) scalar
        text = node.value
        if _LEADING_ZERO_INT.match(text):
            raise UserError(
                f"ambiguous number '{text}' at {_mark(node)} (octal in YAML 1.1)",
                where=f"{out.source} ({path})" if path else out.source,
                hint=f"write {text.lstrip('0+-') or '0'} for a number or quote it: '{text}'",
            )
        if text.lower() in _BOOL_WORDS or re.match(r"^\d+\.\d*0$", text):
            out.raw_scalars[path] = text
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value  # dates stay text: no recipe field is a date
    return loader.construct_object(node)


_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)  # fmt: skip
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


class _Replay(_StrictLoader):
    """Parses the tokens ``_prescan`` scanned: the pure-Python scanner is the slow part of
    loading, and scanning the text once is enough."""

    def __init__(self, tokens: list[yaml.Token]):
        super().__init__("")
        self._tokens, self._next = tokens, 0

    def check_token(self, *choices: Any) -> bool:
        if self._next >= len(self._tokens):
            return False
        return not choices or isinstance(self._tokens[self._next], choices)

    def peek_token(self) -> yaml.Token | None:
        return self._tokens[self._next] if self._next < len(self._tokens) else None

    def get_token(self) -> yaml.Token | None:
        token = self.peek_token()
        self._next += token is not None
        return token


def _prescan(text: str, source: str) -> list[yaml.Token]:
    """Refuse tags and over-deep nesting from the token stream (the scanner is not recursive);
    the tokens, for ``_Replay``."""
    depth = 0
    tokens = list(yaml.scan(text, Loader=_StrictLoader))
    for token in tokens:
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(
                    f"nested deeper than {MAX_DEPTH} levels at line {token.start_mark.line + 1}",
                    where=f"{source}:{token.start_mark.line + 1}",
                    hint="a recipe nests only a few levels; check for unbalanced '[' or '{'",
                )
        elif isinstance(token, _CLOSE):
            depth -= 1
        elif isinstance(token, yaml.TagToken):
            handle, suffix = token.value
            tag = f"{handle or ''}{suffix}"
            raise UserError(
                f"YAML tag '{tag}' at line {token.start_mark.line + 1} is not allowed",
                where=source,
                hint="remove the tag; recipes hold plain data only",
            )
    return tokens


def parse_yaml(text: str, source: str = "<string>") -> LoadedYaml:
    """Parse one YAML document strictly; raise UserError with file:line on any problem."""
    out = LoadedYaml(data=None, source=source)
    try:
        loader = _Replay(_prescan(text, source))
        try:
            node = loader.get_single_node()
            if node is not None:
                out.data = _convert(node, loader, "", out)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        pos = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(
            f"invalid YAML: {exc.problem or exc}", where=pos, hint="fix the syntax"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"invalid YAML: {exc}", where=source) from None
    return out


def parse_scalar(text: str, where: str) -> Any:
    """Parse an override value (KEY=VALUE) as a YAML scalar/flow value with the same rules."""
    if text == "":
        return ""
    return parse_yaml(text, source=where).data


def load_yaml_file(path: Path) -> LoadedYaml:
    """Read and parse a recipe/config file with clear errors for missing or unreadable files."""
    source = str(path)
    if not path.exists():
        raise UserError("file not found", where=source, hint="check the path")
    if path.is_dir():
        raise UserError("is a directory, not a YAML file", where=source)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read file: {exc.strerror}", where=source) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"not UTF-8 text (invalid byte at offset {exc.start})",
            where=source,
            hint="save the file as UTF-8",
        ) from None
    if not text.strip():
        raise UserError(
            "file is empty", where=source, hint="write a recipe with 'name' and 'stages'"
        )
    return parse_yaml(text, source)

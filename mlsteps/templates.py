"""The one template language of the finetune (task causal_lm) and prompt stages, and its renderer.

A template is either

- **format** (the default for a template without ``{{`` or ``{%``): ``{column}`` is replaced by
  that column's text and ``{{`` / ``}}`` are literal braces. A field naming a column with its
  whole text wins (``{Hi.}`` reads the column ``Hi.``); otherwise Python's format rules apply
  (``{meta[k]}``, ``{n:>3}``, ``{source!r}``). A cell holding a list of strings is joined with
  spaces, as fine-tuning always did (a Python list repr in a prompt is never meant).
- **jinja** (``{{ column }}``, ``{% ... %}``; sandboxed, undefined names are errors).

``template_format: auto`` picks jinja when the template contains ``{{`` or ``{%``. A template
that does so *and* also holds a bare ``{column}`` field is refused (exit 2): it is a format
template whose ``{{ }}`` were meant as literal braces (the fine-tune stage's old reading) or a
Jinja template with a stray field; set ``template_format`` to say which.

Torch-free; jinja2 is imported only for Jinja templates.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Literal

TemplateFormat = Literal["format", "jinja"]
FORMATS = ("auto", "format", "jinja")
# A bare single-brace field '{name}': not part of Jinja's '{{', '{%', '{#' nor of a closing '}}'.
_BARE_FIELD = re.compile(r"(?<!\{)\{([A-Za-z_][^{}]*)\}(?!\})")


class TemplateError(ValueError):
    """A template that cannot be parsed or rendered (callers add where= and raise UserError)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def resolve_format(template: str, template_format: str = "auto") -> TemplateFormat:
    """'auto' means Jinja2 when the template contains '{{' or '{%', else format fields."""
    if template_format not in FORMATS:
        raise TemplateError(
            f"unknown template format {template_format!r}", hint="use auto, format or jinja"
        )
    if template_format != "auto":
        return template_format  # type: ignore[return-value]
    if "{{" not in template and "{%" not in template:
        return "format"
    stray = _BARE_FIELD.search(template)
    if stray is not None:
        raise TemplateError(
            f"template mixes Jinja ('{{{{ ... }}}}' or '{{% ... %}}') with the format field "
            f"'{stray.group(0)}'",
            hint="for {column} fields with literal braces written as {{ and }} set "
            "template_format: format; for Jinja write {{ column }} and set template_format: jinja",
        )
    return "jinja"


def jinja_env() -> Any:
    # Sandboxed: a recipe template must not reach Python internals; StrictUndefined so that a
    # misspelled variable is an error instead of silently rendering as "".
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


def _field_column(name: str) -> str:
    """The column a format field reads: its root ('meta' of 'meta[k]', 'row' of 'row.x'), or
    its whole text when that is no Python field expression ('Hi.', 'my col')."""
    try:
        root, rest = _split_field(name)
        list(rest)  # raises on an empty attribute ('Hi.') or an unclosed index
    except ValueError:
        return name
    return str(root)


def _split_field(name: str) -> tuple[Any, Any]:
    import _string  # the parser behind str.format

    return _string.formatter_field_name_split(name)  # type: ignore[no-any-return]


def _parse_format(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"invalid template: {exc}",
            hint="write a literal brace as '{{' / '}}' and set template_format: format",
        ) from None


def template_fields(template: str, template_format: str = "auto") -> list[str]:
    """Column names a template reads, in order of first use, without duplicates."""
    fmt = resolve_format(template, template_format)
    if fmt == "jinja":
        import jinja2
        from jinja2 import meta

        try:
            ast = jinja_env().parse(template)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"invalid Jinja2 template (line {exc.lineno}): {exc.message}"
            ) from None
        return sorted(meta.find_undeclared_variables(ast))
    names: list[str] = []
    for _literal, name, _spec, _conv in _parse_format(template):
        if name is None:
            continue
        column = _field_column(name)
        if not column or column.isdigit():
            raise TemplateError(
                f"template field {{{name}}} is positional", hint="name a column, e.g. '{source}'"
            )
        if column not in names:
            names.append(column)
    return names


def cell_text(value: Any) -> Any:
    """A format field's value: a list of strings joined with spaces (items stripped)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)
    return value


class _RowFormatter(string.Formatter):
    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        if field_name in kwargs:  # a whole column name, dots and spaces included
            return kwargs[field_name], field_name
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        return super().format_field(cell_text(value), format_spec)


class Renderer:
    """A compiled template: ``render(row)`` -> text. One per template (Jinja compiles once)."""

    def __init__(self, template: str, template_format: str = "auto") -> None:
        self.template = template
        self.fmt: TemplateFormat = resolve_format(template, template_format)
        self._jinja = jinja_env().from_string(template) if self.fmt == "jinja" else None

    def render(self, row: Mapping[str, Any]) -> str:
        """The row's text; TemplateError naming a missing column or a render failure."""
        try:
            if self._jinja is not None:
                return str(self._jinja.render(**row))
            return _RowFormatter().vformat(self.template, (), dict(row))
        except KeyError as exc:
            missing = exc.args[0] if exc.args else "?"
            raise TemplateError(
                f"template field '{missing}' is not a column; the row has: {', '.join(row)}"
            ) from None
        except Exception as exc:  # jinja2.UndefinedError and friends, bad format specs
            raise TemplateError(f"cannot render template: {exc}") from None

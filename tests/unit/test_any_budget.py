"""No new ``Any`` in function signatures under mlsteps/ (issue 16): a ratchet.

mypy's ``disallow_any_explicit`` cannot be switched on for the whole package yet: torch,
transformers and datasets are imported inside functions (``--help`` and ``validate`` must stay
instant), so a model or tokenizer crosses a signature as ``Any`` in hundreds of places. Instead
each module has a budget, ``any_budget.json`` next to this file: the number of ``Any`` in its
function signatures (parameter and return annotations, ``typing.Any`` or ``Any``) as measured
when the budget was recorded. A module may not go over its budget, a module not listed has a
budget of 0, and a module that went under it must record the lower number, so the budget only
ever shrinks. Record it with ``python tests/unit/test_any_budget.py --write``.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mlsteps"
BUDGET_FILE = Path(__file__).with_name("any_budget.json")


def _is_any(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "Any"
    if isinstance(node, ast.Attribute):
        return node.attr == "Any" and isinstance(node.value, ast.Name) and node.value.id == "typing"
    # A string annotation ("dict[str, Any]") counts the Any it spells.
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            parsed = ast.parse(node.value, mode="eval")
        except SyntaxError:
            return False
        return any(_is_any(n) for n in ast.walk(parsed))
    return False


def _annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.expr]:
    args = fn.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    params += [a for a in (args.vararg, args.kwarg) if a is not None]
    found = [p.annotation for p in params if p.annotation is not None]
    return found + ([fn.returns] if fn.returns is not None else [])


def count_any(source: str, name: str = "<module>") -> int:
    """How many ``Any`` the function signatures of one module spell."""
    total = 0
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for annotation in _annotations(node):
                total += sum(_is_any(n) for n in ast.walk(annotation))
    return total


def measure() -> dict[str, int]:
    counts = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        n = count_any(path.read_text(encoding="utf-8"), str(path))
        if n:
            counts[path.relative_to(PACKAGE.parent).as_posix()] = n
    return counts


def test_no_module_spells_more_any_than_its_budget() -> None:
    budget = json.loads(BUDGET_FILE.read_text(encoding="utf-8"))
    now = measure()
    over = [f"{m}: {n} Any in signatures, budget {budget.get(m, 0)}" for m, n in now.items()
            if n > budget.get(m, 0)]  # fmt: skip
    assert not over, "give these a real type (or a Protocol / TYPE_CHECKING import):\n" + "\n".join(
        over
    )
    under = [f"{m}: {now.get(m, 0)} (budget {n})" for m, n in budget.items() if now.get(m, 0) < n]
    assert not under, (
        "fewer Any than budgeted: record the lower budget with "
        "`python tests/unit/test_any_budget.py --write`:\n" + "\n".join(under)
    )


def test_the_count_sees_every_spelling() -> None:
    source = (
        "import typing\n"
        "from typing import Any\n"
        "def f(a: Any, *args: Any, b: dict[str, Any] | None = None, **kw: typing.Any) -> Any:\n"
        "    x: Any = 1  # a variable annotation is not a signature\n"
        "    def inner(c: 'list[Any]') -> None: ...\n"
        "class C:\n"
        "    async def m(self, /, d: int) -> tuple[Any, Any]: ...\n"
    )
    # f: a, *args, b, **kw, return = 5; inner: the string annotation = 1; m: 2.
    assert count_any(source) == 8
    assert count_any("def g(a: int) -> str: ...\n") == 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/unit/test_any_budget.py --write")
    BUDGET_FILE.write_text(json.dumps(measure(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {BUDGET_FILE} ({sum(measure().values())} Any in signatures)")

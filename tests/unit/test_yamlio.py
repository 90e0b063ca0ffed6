"""Strict YAML loading: types, line numbers, duplicate keys, tags, ambiguous numbers."""

from __future__ import annotations

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe.yamlio import parse_scalar, parse_yaml


def test_exponent_numbers_are_floats():
    data = parse_yaml("lr: 1e-5\nbig: 5e+3\nplain: 0.5\nint: 10\n").data
    assert data == {"lr": 1e-5, "big": 5000.0, "plain": 0.5, "int": 10}
    assert isinstance(data["lr"], float) and isinstance(data["big"], float)


def test_line_numbers_of_nested_keys():
    doc = parse_yaml("a:\n  b:\n    c: 1\n  d: [x, y]\n", source="f.yaml")
    assert doc.lines["a.b.c"] == 3
    assert doc.lines["a.d"] == 4
    assert doc.where("a.b.c") == "f.yaml:3 (a.b.c)"
    # Unknown child paths fall back to the closest known parent's line.
    assert doc.where("a.b.zzz") == "f.yaml:2 (a.b.zzz)"


def test_duplicate_key_names_both_lines():
    with pytest.raises(UserError, match=r"duplicate key 'b' at line 3 \(first defined at line 2\)"):
        parse_yaml("a:\n  b: 1\n  b: 2\n", source="f.yaml")


@pytest.mark.parametrize(
    "text", ["a: !!python/object/apply:os.system ['echo hi']\n", "a: !custom 3\n", "a: !!str 3\n"]
)
def test_any_tag_is_refused(text):
    with pytest.raises(UserError, match="YAML tag .* is not allowed"):
        parse_yaml(text, source="f.yaml")


def test_leading_zero_integer_is_ambiguous():
    with pytest.raises(UserError, match="ambiguous number '010'"):
        parse_yaml("steps: 010\n")
    assert parse_yaml("steps: '010'\n").data == {"steps": "010"}


def test_invalid_yaml_reports_line_and_column():
    with pytest.raises(UserError) as info:
        parse_yaml("a: [1, 2\nb: 3\n", source="f.yaml")
    assert "f.yaml:" in str(info.value) and "invalid YAML" in str(info.value)


def test_surprising_scalars_are_remembered_for_hints():
    doc = parse_yaml("name: no\nversion: 3.10\n")
    assert doc.data == {"name": False, "version": 3.1}
    assert doc.raw_scalars == {"name": "no", "version": "3.10"}


def test_dates_stay_text():
    assert parse_yaml("d: 2020-01-01\n").data == {"d": "2020-01-01"}


def test_override_scalars():
    assert parse_scalar("50", "x") == 50
    assert parse_scalar("1e-4", "x") == 1e-4
    assert parse_scalar("[a, b]", "x") == ["a", "b"]
    assert parse_scalar("hello world", "x") == "hello world"
    assert parse_scalar("", "x") == ""


def test_merge_keys_are_refused_clearly():
    with pytest.raises(UserError, match="merge keys '<<' are not supported"):
        parse_yaml("a: &x {b: 1}\nc:\n  <<: *x\n")


def test_alias_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(UserError, match="alias bomb"):
        parse_yaml("\n".join(lines) + "\n")

"""Where an error says it happened (mlsteps/errors.py): relative field paths get each enclosing
field_scope in front, absolute locations (file:line, data files) are never touched, and the
one-line message and the exit codes stay what they were. No torch."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from mlsteps.context import StageContext, StageResult, stage_entry
from mlsteps.errors import (
    EXIT_INTERRUPTED,
    EXIT_STAGE_FAILED,
    EXIT_USAGE,
    HERE,
    MlstepsError,
    StageFailed,
    StageInterrupted,
    UserError,
    field_scope,
)


def _raised(exc: MlstepsError, *scopes: str) -> MlstepsError:
    """``exc`` raised inside the nested scopes (outermost first); what came out."""

    def inner(i: int) -> None:
        if i == len(scopes):
            raise exc
        with field_scope(scopes[i]):
            inner(i + 1)

    with pytest.raises(MlstepsError) as info:
        inner(0)
    assert info.value is exc  # the same error object, not a copy: its type and cause stay
    return info.value


def test_nested_scopes_prefix_a_relative_field_outermost_first() -> None:
    err = _raised(UserError("column 'x' not found", field="data"), "stages.ev", "inner")
    assert err.where == "stages.ev.inner.data"
    assert str(err) == "stages.ev.inner.data: column 'x' not found"


def test_here_is_the_scope_itself() -> None:
    err = _raised(UserError("no rows", field=HERE), "stages.ev", "metrics")
    assert err.where == "stages.ev.metrics"
    assert err.field == "stages.ev.metrics"
    # Outside any scope, HERE is no location at all: the message has no "prefix: ".
    bare = UserError("no rows", field=HERE, hint="add rows")
    assert bare.where is None and str(bare) == "no rows (add rows)"


@pytest.mark.parametrize(
    "where",
    ["recipe.yaml:12 (stages.ft.lr)", "data/train.jsonl:3", "/tmp/run/state.json"],
)
def test_absolute_locations_are_never_prefixed(where: str) -> None:
    err = _raised(UserError("bad value", where=where), "stages.ft", "data")
    assert err.where == where and err.location == where
    assert str(err) == f"{where}: bad value"


def test_an_error_without_location_stays_without() -> None:
    # A NaN loss has no field: the stage boundary must not invent one.
    err = _raised(StageFailed("loss is NaN at step 3."), "stages.pt")
    assert err.where is None and err.field is None
    assert str(err) == "loss is NaN at step 3"


def test_one_line_str_unchanged() -> None:
    err = _raised(UserError("a\nb.", field="x", hint="fix\nit"), "stages.s")
    assert str(err) == "stages.s.x: a b (fix it)"
    # The same text as an error built with the whole path as an absolute location.
    assert str(err) == str(UserError("a\nb.", where="stages.s.x", hint="fix\nit"))


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (UserError, EXIT_USAGE),
        (StageFailed, EXIT_STAGE_FAILED),
        (StageInterrupted, EXIT_INTERRUPTED),
    ],
)
def test_exit_codes_unchanged(cls: type[MlstepsError], code: int) -> None:
    err = _raised(cls("m", field="f"), "stages.s")
    assert type(err) is cls and err.exit_code == code and err.where == "stages.s.f"


def test_other_exceptions_pass_through_untouched() -> None:
    with pytest.raises(KeyError), field_scope("stages.s"):
        raise KeyError("k")


def test_scoped_errors_survive_pickling() -> None:
    # Errors travel between processes (the distributed ranks, datasets' map workers).
    err = _raised(UserError("m", field="data", hint="h"), "stages.s")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "stages.s.data: m (h)"


def test_stage_entry_adds_the_stage_name_once(tmp_path: Any) -> None:
    calls: list[str] = []

    @stage_entry
    def run(spec: str, ctx: StageContext) -> StageResult:
        calls.append(spec)
        with field_scope("data"):
            raise UserError("column 'text' not found", field=HERE)

    ctx = StageContext(run_dir=tmp_path, stage="ft", kind="finetune", seed=0)
    with pytest.raises(UserError) as info:
        run("spec", ctx)
    assert calls == ["spec"]
    assert str(info.value) == "stages.ft.data: column 'text' not found"

    @stage_entry
    def ok(spec: str, ctx: StageContext) -> StageResult:
        return StageResult(metrics={"m": 1})

    assert ok("s", ctx).metrics == {"m": 1}


def test_every_stage_kind_runs_behind_the_stage_boundary() -> None:
    """Field errors of a stage are relative to its recipe entry: a stage kind whose ``run`` is
    not behind ``stage_entry`` would print them without ``stages.<name>``. Read from the
    sources (no torch)."""
    import ast
    from pathlib import Path

    from mlsteps.recipe.specs import SPEC_BY_KIND

    stages = Path(__file__).resolve().parents[2] / "mlsteps" / "stages"
    for kind in SPEC_BY_KIND:
        path = stages / kind / "__init__.py"
        path = path if path.is_file() else stages / f"{kind}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        assert len(runs) == 1, f"{path}: no top-level run()"
        decorators = [ast.unparse(d) for d in runs[0].decorator_list]
        assert decorators == ["stage_entry"], f"{path}: run() is not decorated with stage_entry"


def test_an_error_from_rank_zero_gets_the_same_place_on_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_on_main sends rank 0's error to the other ranks; its field must stay relative there,
    so the stage scope around run_on_main names it on every rank alike. Rank 0's side builds
    the payload; a non-main rank is simulated by the broadcast handing that payload back."""
    from mlsteps import distributed

    def fail() -> None:
        raise UserError("column 'x' holds int values, not text", field="data", hint="h")

    with pytest.raises(UserError) as on_main, field_scope("stages.tok"):
        fail()
    payload = distributed._error_payload(UserError("column 'x' holds int values, not text",
                                                   field="data", hint="h"))  # fmt: skip
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: (None, payload))
    with pytest.raises(UserError) as on_other, field_scope("stages.tok"):
        distributed.run_on_main(fail)
    assert on_other.value.where == on_main.value.where == "stages.tok.data"
    assert (
        str(on_other.value) == "stages.tok.data: rank 0: column 'x' holds int values, not text (h)"
    )

"""`streaming: true` on a data source (issue 19): accepted where a stream can be packed (a
pretrain stage's files or hub data), refused at the key with one line everywhere else.
Pure validation: no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe


def _pretrain(**stage: Any) -> dict[str, Any]:
    base = {"kind": "pretrain", "from": "gpt2", "validation": "v.txt"}
    return {"name": "r", "stages": {"pt": {**base, **stage}}}


def _at(err: UserError) -> str:
    return str(err.where).rsplit("(", 1)[-1].rstrip(")")


def _error(recipe: dict[str, Any]) -> UserError:
    with pytest.raises(UserError) as err:
        validate_recipe(recipe)
    return err.value


def test_streamed_pretrain_sources_are_accepted() -> None:
    for data in (
        {"files": ["a.txt"], "streaming": True, "max_samples": 10},
        {"hub": "wikitext", "hub_config": "raw", "revision": "abc123", "streaming": True},
        [{"files": ["a.txt"], "streaming": True}, {"files": ["b.jsonl"]}],
    ):
        spec = validate_recipe(_pretrain(data=data)).stages["pt"]
        assert spec.data[0].streaming
    # Streamed validation, and no validation at all when nothing is held out.
    stream = {"files": ["v.txt"], "streaming": True}
    validate_recipe(_pretrain(data=stream, validation={"web": stream}))
    no_val = {**_pretrain(data=stream, validation_fraction=0)}
    del no_val["stages"]["pt"]["validation"]
    validate_recipe(no_val)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"builtin": "toy/corpus", "streaming": True}, "data.streaming", "cannot be streamed"),
        ({"files": ["a.txt"], "streaming": True, "shuffle_seed": 1}, "data.shuffle_seed", "once"),
        ({"files": ["a.txt"], "streaming": True, "rows": ":90%"}, "data.rows", "row count"),
        ({"files": ["a.json"], "streaming": True}, "data.streaming", "json array"),
        (
            [{"files": ["a.txt"]}, {"files": ["b.txt"], "streaming": True, "rows": "1:"}],
            "data.1.rows",
            "streaming",
        ),
    ],
)
def test_what_a_stream_cannot_do_is_refused_at_its_key(data: Any, key: str, words: str) -> None:
    err = _error(_pretrain(data=data))
    assert _at(err) == f"stages.pt.{key}" and words in str(err)


def test_streamed_data_needs_explicit_validation() -> None:
    recipe = _pretrain(data={"files": ["a.txt"], "streaming": True})
    del recipe["stages"]["pt"]["validation"]
    err = _error(recipe)
    assert _at(err) == "stages.pt.data.streaming" and "validation_fraction" in str(err)
    assert "validation" in (err.hint or "")


def test_streaming_outside_pretrain_is_refused() -> None:
    ft = {"kind": "finetune", "task": "causal_lm", "from": "gpt2",
          "data": {"files": ["d.jsonl"], "streaming": True}}  # fmt: skip
    err = _error({"name": "r", "stages": {"ft": ft}})
    assert _at(err) == "stages.ft.data.streaming" and "pretrain" in str(err)
    tok = {
        "kind": "tokenizer",
        "data": [{"files": ["a.txt"]}, {"files": ["b.txt"], "streaming": True}],
    }
    err = _error({"name": "r", "stages": {"tok": tok}})
    assert _at(err) == "stages.tok.data.1.streaming"


def test_validate_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text\n", "utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nstages:\n  pt:\n    kind: pretrain\n    from: gpt2\n"
        "    data: {files: [a.txt], streaming: true, shuffle_seed: 3}\n    validation: a.txt\n",
        "utf-8",
    )
    res = subprocess.run(
        [sys.executable, "-m", "mlsteps", "validate", str(recipe)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr and "r.yaml:6" in lines[0] and "shuffle_seed" in lines[0]

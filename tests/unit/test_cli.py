"""The CLI contract: exit codes, one-line errors, --json on stdout, no heavy imports at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlsteps.cli import main

HEAVY = (
    "torch",
    "transformers",
    "datasets",
    "peft",
    "accelerate",
    "sacrebleu",
    "rouge_score",
    "nltk",
    "lm_eval",
)
GOOD = """\
name: cli
stages:
  tok: {kind: tokenizer, from: some/tokenizer}
"""


def call(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_validate_ok_and_json(write_recipe, capsys):
    path = write_recipe(GOOD)
    code, out, _ = call(["validate", str(path)], capsys)
    assert code == 0 and "valid recipe 'cli'" in out
    code, out, _ = call(["validate", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out) == {
        "valid": True,
        "name": "cli",
        "stages": {"tok": "tokenizer"},
    }


@pytest.mark.parametrize(
    ("text", "args", "fragment"),
    [
        (GOOD, ["stages.tok.vocab_sise=3"], "did you mean 'vocab_size'"),
        (GOOD, ["bogus"], "is not KEY=VALUE"),
        ("name: x\n", [], "missing required key 'stages'"),
        (GOOD, ["stages.tok.data=/no/such/file.txt"], "data file '/no/such/file.txt' not found"),
    ],
)
def test_errors_exit_2_with_one_line(write_recipe, capsys, text, args, fragment):
    code, out, err = call(["validate", str(write_recipe(text)), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_json_errors_go_to_stdout(write_recipe, capsys):
    code, out, err = call(["validate", str(write_recipe("name: x\n")), "--json"], capsys)
    assert code == 2 and json.loads(out)["exit_code"] == 2 and err.startswith("error:")


def test_usage_error_is_exit_2(capsys):
    code, _, err = call(["run"], capsys)
    assert code == 2 and "Missing argument" in err
    code, _, _ = call(["no-such-command"], capsys)
    assert code == 2


def test_debug_shows_traceback(capsys):
    code, _, err = call(["--debug", "validate", "/no/such/recipe.yaml"], capsys)
    assert code == 2 and "Traceback" in err


def test_schema_is_json(capsys):
    code, out, _ = call(["schema"], capsys)
    assert code == 0
    schema = json.loads(out)
    assert "stages" in schema["properties"]


def test_report_of_non_run_dir(tmp_path, capsys):
    code, _, err = call(["report", str(tmp_path)], capsys)
    assert code == 2 and "not a run directory" in err


def _imported_after(args: list[str]) -> list[str]:
    code = (
        "import sys\n"
        "from mlsteps.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("HEAVY="), out.stdout
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def test_help_and_validate_import_nothing_heavy(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    assert _imported_after(["--help"]) == []
    assert _imported_after(["run", "--help"]) == []
    assert _imported_after(["validate", str(recipe)]) == []
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    if quickstart.exists():
        assert _imported_after(["validate", str(quickstart)]) == []


def test_real_subprocess_exit_codes(write_recipe):
    ok = subprocess.run(
        [sys.executable, "-m", "mlsteps", "validate", str(write_recipe(GOOD))],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "mlsteps", "validate", str(write_recipe("[1, 2]\n"))],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a list" in bad.stderr

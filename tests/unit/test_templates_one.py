"""One template language for the finetune (causal_lm) and prompt stages, one renderer, and the
fine-tune's mlsteps_prompt.json written whenever a template built the training inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _sft(template: str, **extra: Any) -> Any:
    from mlsteps.recipe.specs.finetune import FinetuneSpec

    fields = {"kind": "finetune", "task": "causal_lm", "from": "x", "data": "x.jsonl"}
    return FinetuneSpec.model_validate({**fields, "template": template, **extra})


def _prompt_file(spec: Any, rows: list[dict[str, Any]], tmp_path: Path) -> dict[str, str]:
    import datasets

    from mlsteps.stages.finetune.evaluation import prompter_json

    logged: list[str] = []
    ctx = SimpleNamespace(final_dir=tmp_path / "final", log=logged.append)
    return prompter_json(spec, ctx, datasets.Dataset.from_list(rows), "base")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "rows", "response"),
    [
        # A headerless TSV's first row names the columns ("Hi.", "嗨。"): not a Python identifier.
        ("English: {Hi.}\nChinese: ", [{"Hi.": "Run.", "嗨。": "跑。"}], "嗨。"),
        # SciTLDR's source is a list of sentences (configs/examples/sft-gpt2*.yaml).
        ("{source}\nTL;DR: ", [{"source": ["One.", " Two."], "target": ["t"]}], "target"),
    ],
)
def test_finetune_always_writes_its_prompt_file(
    template: str, rows: list[dict[str, Any]], response: str, tmp_path: Path
) -> None:
    """Before: the converter to prompt-stage templates skipped mlsteps_prompt.json for these
    (only a log line), so eval/predict fed the bare input column to the tuned model."""
    from mlsteps.prompt.prompter import PROMPT_FILE, Prompter
    from mlsteps.stages.finetune import data as fd

    spec = _sft(template, response_column=response)
    files = _prompt_file(spec, rows, tmp_path)
    assert list(files) == [PROMPT_FILE]
    prompter = Prompter.from_json(json.loads(files[PROMPT_FILE]))
    trained = fd.sft_prompt(rows[0], spec, index=0)
    # Eval/predict build exactly the training prompt (trailing spaces move to the answer side).
    assert prompter.render(rows[0]) + prompter.answer_prefix == trained


def test_one_renderer_for_both_stages() -> None:
    from mlsteps.prompt.prompter import render_template
    from mlsteps.stages.finetune import data as fd

    row = {"source": "hi", "words": ["a", "b"], "Hi.": "x"}
    for template in ("Q: {source}", "{Hi.} -> {source}", "{{ source | upper }}!"):
        spec = _sft(template)
        assert fd.sft_prompt(row, spec, index=0) == render_template(template, row)
    assert render_template("{words}", row) == "a b"  # a list cell is joined, never its repr
    assert render_template("{{ words | join('+') }}", row) == "a+b"  # Jinja sees the list


def test_double_brace_means_one_thing_and_the_old_reading_is_refused() -> None:
    """'{{' opens a Jinja expression under template_format auto in both stages; a template that
    also holds a '{column}' field was written for the old fine-tune reading ('{{' a literal
    brace): exit 2 naming template_format, never a silently different prompt."""
    from pydantic import ValidationError

    from mlsteps.errors import UserError
    from mlsteps.prompt.prompter import render_template, template_fields

    old = 'JSON: {{"q": "{source}"}}\nA: '
    with pytest.raises(ValidationError, match="template_format: format"):
        _sft(old)
    with pytest.raises(UserError, match="template_format: format"):
        template_fields(old)
    spec = _sft(old, template_format="format")
    from mlsteps.stages.finetune import data as fd

    expected = 'JSON: {"q": "hi"}\nA: '
    assert fd.sft_prompt({"source": "hi"}, spec, index=0) == expected
    assert render_template(old, {"source": "hi"}, "format") == expected


def test_validate_exits_2_on_an_ambiguous_finetune_template(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nstages:\n  sft:\n    kind: finetune\n    task: causal_lm\n"
        "    from: gpt2\n"
        "    data: {builtin: toy/translate}\n"
        '    template: "{{x}} {source}"\n    response_column: target\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "mlsteps", "validate", str(recipe)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "template_format" in done.stderr and "Traceback" not in done.stderr
    assert "stages.sft" in done.stderr

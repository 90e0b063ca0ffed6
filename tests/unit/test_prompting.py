"""Hard-prompt machinery without torch: templates, few-shot selection, the prompted-model file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from mlsteps.errors import UserError
from mlsteps.prompt.prompter import (
    PROMPT_FILE,
    Demonstration,
    Prompter,
    check_template_columns,
    demonstrations_from_rows,
    load_prompter,
    render_template,
    resolve_format,
    save_prompter,
    select_demonstrations,
    split_separator,
    template_fields,
)
from mlsteps.recipe.specs.prompt import PromptSpec

ROWS = [{"source": f"s{i}", "target": f"t{i}", "label": i % 2} for i in range(20)]


def test_format_detection():
    assert resolve_format("Q: {source}") == "format"
    assert resolve_format("Q: {{ source }}") == "jinja"
    assert resolve_format("{% if source %}x{% endif %}") == "jinja"
    assert resolve_format("Q: {{ source }}", "format") == "format"


def test_python_format_fields_and_rendering():
    tpl = "Translate: {source}\nLen {source!r} {n:>3} {meta[k]}"
    assert template_fields(tpl) == ["meta", "n", "source"]
    out = render_template(tpl, {"source": "hi", "n": 7, "meta": {"k": "v"}})
    assert out == "Translate: hi\nLen 'hi'   7 v"


def test_jinja_fields_and_rendering():
    tpl = "{% for w in words %}{{ w|upper }} {% endfor %}-> {{ source }}"
    assert template_fields(tpl) == ["source", "words"]
    assert render_template(tpl, {"words": ["a", "b"], "source": "x"}) == "A B -> x"


def test_jinja_is_sandboxed_and_strict():
    # StrictUndefined: an undefined name must not silently render as "".
    with pytest.raises(UserError, match="cannot render"):
        render_template("{{ missing }}", {"source": "x"})
    with pytest.raises(UserError):
        render_template("{{ source.__class__.__mro__[1].__subclasses__() }}", {"source": "x"})


def test_missing_field_names_existing_columns():
    with pytest.raises(UserError) as err:
        check_template_columns("Q: {sorce}", ["source", "target"], field="stages.p.template")
    msg = str(err.value)
    assert "sorce" in msg and "source, target" in msg and "did you mean 'source'" in msg
    assert msg.startswith("stages.p.template:")
    with pytest.raises(UserError, match="'src' is not a column"):
        check_template_columns("{{ src }}", ["source"])


@pytest.mark.parametrize("tpl", ["Q: {}", "Q: {0}", "Q: {source"])
def test_bad_format_templates(tpl):
    with pytest.raises(UserError):
        template_fields(tpl)


def test_jinja_syntax_error_is_user_error():
    with pytest.raises(UserError, match="line 1"):
        template_fields("{% if x %}unterminated")


def test_selection_is_deterministic_and_seed_dependent():
    a = select_demonstrations(100, 5, seed=3)
    assert a == select_demonstrations(100, 5, seed=3)
    assert len(set(a)) == 5 and all(0 <= i < 100 for i in a)
    assert a != select_demonstrations(100, 5, seed=4)
    assert select_demonstrations(100, 5, seed=3, key="row1") != select_demonstrations(
        100, 5, seed=3, key="row2"
    )
    assert 7 not in select_demonstrations(8, 7, seed=0, exclude=[7])
    with pytest.raises(UserError, match="5 shots"):
        select_demonstrations(4, 5, seed=0)


def test_selection_is_stable_across_processes():
    # PYTHONHASHSEED differs per process; the selection must not depend on it.
    code = (
        "from mlsteps.prompt.prompter import select_demonstrations as s;"
        "print(s(50, 4, 11), s(50, 4, 11, key='k'))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h), "PATH": ""},
        ).stdout
        for h in (1, 2)
    }
    assert len(outs) == 1
    assert (
        outs.pop().strip()
        == f"{select_demonstrations(50, 4, 11)} {select_demonstrations(50, 4, 11, key='k')}"
    )


def test_separator_split_puts_trailing_whitespace_on_answer_side():
    assert split_separator(" ") == ("", " ")
    assert split_separator("\nAnswer: ") == ("\nAnswer:", " ")
    assert split_separator(" =>") == (" =>", "")


def _few_shot(per_example: bool, seed: int = 0) -> Prompter:
    p = Prompter(
        method="few_shot",
        template="Q: {source}\nA:",
        answer_separator=" ",
        demo_separator="\n\n",
        per_example=per_example,
        shots=3,
        seed=seed,
    )
    pool = demonstrations_from_rows(ROWS, p)
    if per_example:
        p.demo_pool = pool
    else:
        p.demos = [pool[i] for i in select_demonstrations(len(pool), 3, seed)]
    return p


def test_few_shot_prompt_layout():
    p = _few_shot(per_example=False)
    text = p.render({"source": "new"})
    blocks = text.split("\n\n")
    assert len(blocks) == 4 and blocks[-1] == "Q: new\nA:"
    for block, demo in zip(blocks, p.demos, strict=False):
        assert block == f"{demo.prompt} {demo.answer}"
    # The answer side gets the separator's whitespace.
    assert p.continuation("t9") == " t9"
    # Same demos for every row.
    assert p.render({"source": "other"}).split("\n\n")[:3] == blocks[:3]


def test_per_example_demos_vary_by_row_but_are_reproducible():
    p, q = _few_shot(per_example=True), _few_shot(per_example=True)
    first = {p.render({"source": f"x{i}"}).split("\n\n")[0] for i in range(10)}
    assert len(first) > 1  # different rows see different demos
    for i in range(10):
        assert p.render({"source": f"x{i}"}) == q.render({"source": f"x{i}"})
    assert _few_shot(True, seed=1).render({"source": "x0"}) != p.render({"source": "x0"})


def test_per_example_never_shows_the_query_as_its_own_demo():
    p = _few_shot(per_example=True)
    for row in ROWS:
        demos = p.render(row).split("\n\n")[:-1]
        assert f"Q: {row['source']}\nA: {row['target']}" not in demos


def test_verbalizer_answers_and_unknown_label():
    p = Prompter(
        method="few_shot", template="{source}", task="classification", target_column="label"
    )
    p.verbalizer = {"0": "bad", "1": "great"}
    demos = demonstrations_from_rows(ROWS[:2], p)
    assert [d.answer for d in demos] == ["bad", "great"]
    with pytest.raises(
        UserError, match="label 2 has no verbalizer word; the verbalizer has words for labels: 0, 1"
    ):
        p.label_word(2)


def test_postprocess_cuts_at_next_demo():
    p = _few_shot(per_example=False)
    assert p.postprocess(" t4\n\nQ: s5\nA: t5") == "t4"
    assert (
        Prompter(method="zero_shot", template="{source}").postprocess("  hi there \n") == "hi there"
    )


def test_save_and_load_roundtrip_with_relative_base(tmp_path: Path):
    base = tmp_path / "run" / "pretrain" / "final"
    base.mkdir(parents=True)
    final = tmp_path / "run" / "prompt" / "final"
    final.mkdir(parents=True)
    p = _few_shot(per_example=False)
    p.base_model = str(base)
    p.verbalizer = {"0": "bad"}
    save_prompter(p, final)
    data = json.loads((final / PROMPT_FILE).read_text())
    assert data["base_model_relative"] == "../../pretrain/final"
    loaded = load_prompter(final)
    assert loaded is not None and loaded.render({"source": "q"}) == p.render({"source": "q"})
    assert loaded.demos == p.demos and isinstance(loaded.demos[0], Demonstration)
    assert loaded.verbalizer == {"0": "bad"} and not loaded.has_adapter
    # Move the whole run directory: the relative reference still resolves.
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    again = load_prompter(moved / "prompt" / "final")
    assert again is not None and again.base_model == str((moved / "pretrain" / "final").resolve())


def test_load_prompter_on_plain_dir_is_none(tmp_path: Path):
    assert load_prompter(tmp_path) is None
    (tmp_path / PROMPT_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        load_prompter(tmp_path)


def test_prompting_does_not_import_torch():
    code = "import sys, mlsteps.prompt.prompter; assert 'torch' not in sys.modules and 'jinja2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _spec(**kw):
    return PromptSpec.model_validate({"kind": "prompt", "from": "m", **kw})


def test_spec_verbalizer_int_keys_and_cross_checks():
    s = _spec(method="zero_shot", task="classification", verbalizer={1: "great", 0: "bad"})
    assert s.verbalizer == {"1": "great", "0": "bad"}
    with pytest.raises(ValidationError, match="per_example"):
        _spec(method="zero_shot", per_example=True)
    with pytest.raises(ValidationError, match="init_text"):
        _spec(method="prefix_tuning", data="x.jsonl", init_text="hello")
    with pytest.raises(ValidationError, match="needs 'data'"):
        _spec(method="few_shot")
    assert _spec(method="prompt_tuning", data="x.jsonl").train.lr == pytest.approx(3e-2)

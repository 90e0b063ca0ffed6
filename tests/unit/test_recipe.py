"""Recipe validation: messages name file:line and the dotted path and suggest fixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import Recipe, apply_overrides, load_recipe

BASE = """\
name: demo
seed: 7
defaults: {train: {batch_size: 16, lr: 1e-3}}
stages:
  tok: {kind: tokenizer, data: "builtin:toy/corpus", vocab_size: 500}
  pre:
    kind: pretrain
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 32}
    data: builtin:toy/corpus
    train: {max_steps: 10, lr: 5e-4}
  ev: {kind: eval, models: [pre], data: "builtin:toy/corpus", metrics: [perplexity]}
"""


def load(write_recipe, text: str = BASE, overrides: list[str] | None = None) -> Recipe:
    return load_recipe(write_recipe(text), overrides or [])


def error_of(write_recipe, text: str = BASE, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load(write_recipe, text, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_recipe_with_defaults_merged(write_recipe):
    recipe = load(write_recipe)
    pre = recipe.stages["pre"]
    assert pre.train.batch_size == 16  # from defaults
    assert pre.train.lr == 5e-4  # the stage's own value wins
    assert recipe.stages["tok"].kind == "tokenizer"  # no 'train' field: defaults skipped
    assert list(recipe.stages) == ["tok", "pre", "ev"]


def test_resolved_recipe_round_trips(write_recipe, tmp_path):
    import yaml

    recipe = load(write_recipe)
    text = yaml.safe_dump(recipe.resolved_dict(), sort_keys=False)
    again = load_recipe(write_recipe(text, "resolved.yaml"))
    assert again.resolved_dict() == recipe.resolved_dict()


def test_overrides_set_and_remove(write_recipe):
    recipe = load(write_recipe, overrides=["stages.pre.train.max_steps=50", "seed=3"])
    assert recipe.stages["pre"].train.max_steps == 50 and recipe.seed == 3
    recipe = load(write_recipe, overrides=["~stages.pre.train.max_steps"])
    assert recipe.stages["pre"].train.max_steps is None
    raw = apply_overrides({"a": {"b": [1, 2]}}, ["a.b.1=5", "a.c.d=x"])
    assert raw == {"a": {"b": [1, 5], "c": {"d": "x"}}}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["stages.pre.train.lrr=1"],
            r"recipe.yaml:11 \(stages.pre.train.lrr\): unknown key 'lrr' \(did you mean 'lr'\?\)",
        ),
        (
            ["stages.pre.kind=pretrian"],
            r"stages.pre.kind\): unknown stage kind 'pretrian' \(did you mean 'pretrain'\?\)",
        ),
        (["seed=abc"], r"recipe.yaml:2 \(seed\): .*valid integer"),
        (["stages.pre.tokenizer=tk"], r"unknown stage 'tk' \(did you mean 'tok'\?\)"),
        (["stages.pre.tokenizer=ev"], r"'ev' is a later stage"),
        (["stages.pre.tokenizer=pre"], r"refers to itself"),
        (["name=../x"], r"run name '../x' must be one path component"),
        (
            ["stages.pre.train.batch_size=0"],
            r"stages.pre.train.batch_size\): Input should be greater than 0",
        ),
        (["stages.pre.train.lr=-1e-3"], r"stages.pre.train.lr\): Input should be greater than 0"),
        (["stages.pre.model.family=bert"], r"objective clm needs a decoder family"),
        (["stages.pre.max_seq_len=1024"], r"max_seq_len 1024 exceeds model.max_positions 512"),
        (["~stages.pre.data"], r"missing required key 'data'"),
        (
            ["stages.ev.metrics=[perplexty]"],
            r"unknown metric 'perplexty' .*did you mean 'perplexity'",
        ),
        (["defaults.trian={lr: 1}"], r"unknown key 'trian' in defaults \(did you mean 'train'\?\)"),
        (["stages.pre.typo_key=1"], r"unknown key 'typo_key'"),
        (["stages.tok.kind=~"], r"stages.tok.kind"),
        (["stages={}"], r"at least one stage"),
    ],
)
def test_error_messages(write_recipe, overrides, expected):
    assert pytest.importorskip("re").search(expected, error_of(write_recipe, overrides=overrides))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "file is empty"),
        ("- a\n- b\n", "not a list"),
        ("name: x\nstages:\n  a: {kind: eval}\n  a: {kind: eval}\n", "duplicate key 'a'"),
        ("name: !!python/object:os.system x\n", "YAML tag"),
        ("name: [unclosed\n", "invalid YAML"),
        ("name: no\nstages: {t: {kind: tokenizer, data: x.txt}}\n", "quote it"),
        ("name: x\nseed: 010\nstages: {}\n", "ambiguous number"),
        (
            "name: x\nstages:\n  s: {kind: tokenizer, from: gpt2, bogus: 1}\n",
            "recipe.yaml:3 (stages.s.bogus): unknown key",
        ),
    ],
)
def test_bad_files(write_recipe, text, expected):
    assert expected in error_of(write_recipe, text)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_recipe(bad)


def test_hub_ids_pass_and_stage_names_resolve(write_recipe):
    text = "name: x\nstages:\n  ft: {kind: finetune, task: classification, from: bert-base-uncased, data: x.csv}\n"
    recipe = load(write_recipe, text)
    assert recipe.stages["ft"].from_ == "bert-base-uncased"


def test_schema_has_descriptions_everywhere():
    schema = Recipe.model_json_schema(by_alias=True)
    missing = []

    def walk(node, path):
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                if "description" not in prop and name != "kind":
                    missing.append(f"{path}.{name}")
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(schema, "")
    assert not missing, missing
    assert json.dumps(schema)


def test_every_shipped_config_validates():
    root = Path(__file__).resolve().parents[2] / "configs"
    configs = sorted(root.rglob("*.yaml"))
    for path in configs:
        load_recipe(path)  # raises with file:line on any problem


def test_committed_recipe_reference_is_current():
    from mlsteps.recipe.reference import recipe_reference

    path = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"
    assert path.read_text(encoding="utf-8") == recipe_reference(), (
        "docs/recipe-reference.md is stale: run `mlsteps schema --markdown > docs/recipe-reference.md`"
    )


def test_missing_local_model_directory_is_caught_at_validation(write_recipe):
    text = "name: x\nstages:\n  ev: {kind: eval, models: [./nowhere/model], data: x.txt, metrics: [perplexity]}\n"
    assert (
        "recipe.yaml:3 (stages.ev.models.0): model directory './nowhere/model' not found"
        in error_of(write_recipe, text)
    )


@pytest.mark.parametrize(
    "name", ["state.json", "report.md", "recipe.yaml", "metrics.json", "env.json"]
)
def test_stage_names_of_run_files_are_reserved(write_recipe, name):
    text = f"name: x\nstages:\n  {name}: {{kind: tokenizer, from: a/b}}\n"
    assert f"stage name '{name}' is reserved" in error_of(write_recipe, text)


def test_overrides_reach_below_a_data_shorthand(write_recipe):
    recipe = load(
        write_recipe, overrides=["stages.pre.data.max_samples=5", "stages.pre.data.split=test"]
    )
    (data,) = recipe.stages["pre"].data  # one source, held as a list of one
    assert (data.builtin, data.max_samples, data.split) == ("toy/corpus", 5, "test")


def test_data_source_errors_name_the_place_as_written(write_recipe):
    head = "name: x\nstages:\n  tok: {kind: tokenizer, data: a.txt}\n  pre:\n    kind: pretrain\n"
    head += "    tokenizer: tok\n    model: {family: gpt2}\n"
    one = head + "    data: {builtin: toy/corpus, max_samples: 0}\n"
    assert "recipe.yaml:8 (stages.pre.data.max_samples)" in error_of(write_recipe, one)
    several = head + "    data: [builtin:toy/corpus, {builtin: toy/corpus, max_samples: 0}]\n"
    assert "recipe.yaml:8 (stages.pre.data.1.max_samples)" in error_of(write_recipe, several)

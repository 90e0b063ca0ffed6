"""The example recipes in configs/examples: every hub recipe has an offline `-local.yaml` twin,
both validate, and every twin runs end to end here on ../shared/data with a tiny model
(`make examples`; the runs are marked slow, so `make test` only does the cheap checks).

Twins are discovered by glob, so a new `*-local.yaml` is covered without touching this file.
Checks common to all twins: every stage done, a metrics entry and a final/ (or predictions) per
stage, report.md with every stage and the ladder; then a few per-example checks on the numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from mlsteps.recipe import load_recipe
from mlsteps.rundir import read_json

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "configs" / "examples"
TWINS = sorted(EXAMPLES.glob("*-local.yaml"))
FULL = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.endswith("-local.yaml"))


def test_every_example_has_a_local_twin():
    assert FULL, "no example recipes found"
    missing = [p.name for p in FULL if not (EXAMPLES / f"{p.stem}-local.yaml").exists()]
    assert not missing, f"examples without a -local.yaml twin: {missing}"
    orphans = [p.name for p in TWINS if not (EXAMPLES / p.name.replace("-local", "")).exists()]
    assert not orphans, f"-local.yaml twins without their example: {orphans}"


@pytest.mark.parametrize("path", FULL + TWINS, ids=lambda p: p.name)
def test_example_validates(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # twins read ../shared/data relative to the repository root
    recipe = load_recipe(path)
    assert recipe.stages
    if path in TWINS:
        text = path.read_text(encoding="utf-8")
        assert "hub:" not in text, f"{path.name} must run offline (no hub data)"
        assert recipe.name == path.stem, "a twin's run directory should be named after its file"


# ---------------------------------------------------------------- running the twins


@pytest.fixture
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine spinning
    OpenMP threads make them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check_run(run_dir: Path, recipe: Any) -> dict[str, Any]:
    state = read_json(run_dir / "state.json")["stages"]
    metrics = read_json(run_dir / "metrics.json")
    assert {n: s["status"] for n, s in state.items()} == {n: "done" for n in recipe.stages}
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for name, spec in recipe.stages.items():
        assert name in metrics, f"stage {name} reported no metrics"
        assert f"## {name}\n" in report
        stage_dir = run_dir / name
        if spec.kind in ("tokenizer", "pretrain", "finetune", "prompt", "preference"):
            assert (stage_dir / "final").is_dir(), f"{name}: no final/"
        if spec.kind == "predict":
            lines = (stage_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
            assert lines and len(lines) == metrics[name]["predictions"]
        if spec.kind == "eval":
            rows = list(metrics[name])
            if {"accuracy", "f1"} & set(spec.metrics):  # classification ladders end with it
                assert rows[-1] == "majority_baseline"
                rows = rows[:-1]
            assert rows == list(spec.models), "one ladder row per model, in order"
            assert f"## Stage ladder ({name})" in report
            for row in metrics[name].values():
                numbers = {k: v for k, v in row.items() if not isinstance(v, str)}
                assert numbers and all(_finite(v) for v in numbers.values()), row
    return metrics


def _check_pretrain_wikitext(metrics: dict[str, Any]) -> None:
    for stage in ("base", "pretrain"):
        m = metrics[stage]
        assert m["val_perplexity"] < m["initial_val_perplexity"], stage
    ladder = metrics["eval"]
    # Continued pretraining must not make the test perplexity worse than where it started.
    assert ladder["pretrain"]["perplexity"] < ladder["base"]["perplexity"] * 1.05
    assert "stride" in ladder["pretrain"]["perplexity_convention"]


def _check_summarize(metrics: dict[str, Any]) -> None:
    assert 0 <= metrics["eval"]["summary"]["rouge1"] <= 1
    assert "rouge_convention" in metrics["eval"]["summary"]
    assert "val_rouge1" in metrics["finetune"]


def _check_chinese(metrics: dict[str, Any]) -> None:
    translate = metrics["translate"]
    assert "tok:zh" in translate["val_bleu_signature"], (
        "Chinese BLEU needs sacrebleu's zh tokenizer"
    )
    assert _finite(translate["val_chrf"]) and _finite(translate["val_rouge1"])
    assert metrics["pretrain"]["val_perplexity"] < metrics["pretrain"]["initial_val_perplexity"]
    # Both models scored on plain Lu Xun text (the fine-tune's template does not apply), and
    # the fine-tune tested on held-out Tatoeba rows with Chinese tokenisation.
    assert set(metrics["eval"]) == {"pretrain", "translate"}
    test = metrics["test"]["translate"]
    assert "tok:zh" in test["bleu_signature"] and _finite(test["chrf"]) and _finite(test["rouge1"])


def _check_dpo_chat(metrics: dict[str, Any]) -> None:
    dpo = metrics["dpo"]
    assert dpo["val_reward_accuracy"] > dpo["val_reward_accuracy_start"] == 0.0
    assert dpo["val_reward_margin"] > 0
    ladder = metrics["eval"]
    assert set(ladder) == {"sft", "dpo"}
    assert ladder["dpo"]["preference_pairs"] == 100
    assert ladder["dpo"]["preference_accuracy"] >= ladder["sft"]["preference_accuracy"]


SPECIFIC = {
    "pretrain-gpt2-wikitext-local.yaml": _check_pretrain_wikitext,
    "summarize-t5-local.yaml": _check_summarize,
    "chinese-pipeline-local.yaml": _check_chinese,
    "dpo-chat-local.yaml": _check_dpo_chat,
}


@pytest.mark.slow
@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.name)
def test_local_twin_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any
):
    shared = REPO.parent / "shared" / "data"
    if not shared.exists():
        pytest.skip(f"shared data not found at {shared}")
    from mlsteps.runner import run_recipe

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = load_recipe(path)
    run_dir = tmp_path / recipe.name
    result = run_recipe(recipe, run_dir, quiet=True)
    assert result.exit_code == 0
    metrics = _check_run(run_dir, recipe)
    check = SPECIFIC.get(path.name)
    if check is not None:
        check(metrics)

"""The eval stage's `lm_eval:` block against the `lm_eval` command line (no downloads).

A local task directory (a multiple-choice task and a rolling-loglikelihood perplexity task,
`dataset_path: json` on builtin toy data written to tmp) is run by `mlsteps run` on a tiny
pretrained model and its LoRA adapter, and by `python -m lm_eval` on the same two models: every
number is equal. What lm-eval cannot score (prompted models, masked LMs) is refused by
`validate` with exit 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlsteps.builtin import load_builtin

TASKS = ("toy_sentiment_mc", "toy_corpus_ppl")

MC_TASK = """\
task: toy_sentiment_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{['negative', 'positive'].index(label)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
PPL_TASK = """\
task: toy_corpus_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 2.0
"""

RECIPE = """\
name: lmeval
seed: 3
defaults: {{train: {{save_every_steps: 1000, log_every_steps: 5}}}}
stages:
  tok: {{kind: tokenizer, data: builtin:toy/corpus, vocab_size: 400}}
  pretrain:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {{family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 128}}
    data: {{builtin: toy/corpus, max_samples: 300}}
    max_seq_len: 64
    train: {{max_steps: 20, batch_size: 8, lr: 3.0e-3}}
  lora:
    kind: finetune
    task: causal_lm
    from: pretrain
    method: lora
    data: {{builtin: toy/sentiment, max_samples: 100}}
    template: "{{text}}\\nSentiment: "
    response_column: label
    max_seq_len: 48
    train: {{max_steps: 10, batch_size: 8, lr: 5.0e-3}}
  ev:
    kind: eval
    models: [pretrain, lora]
    lm_eval:
      tasks: [{tasks}]
      include_path: {include}
      num_fewshot: 1
      limit: 12
      batch_size: 4
"""


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    sentiment = _jsonl(root / "sentiment.jsonl", load_builtin("toy/sentiment", "test")[:20])
    corpus = _jsonl(root / "corpus.jsonl", load_builtin("toy/corpus", "test")[:10])
    (root / "toy_sentiment_mc.yaml").write_text(MC_TASK.format(data=sentiment), encoding="utf-8")
    (root / "toy_corpus_ppl.yaml").write_text(PPL_TASK.format(data=corpus), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def run(tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("run")
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(tasks=", ".join(TASKS), include=tasks_dir), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mlsteps", "run", str(recipe), "--run-dir", str(work / "run")],
        env=_env(), cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


def _cli_results(model_args: str, tasks_dir: Path, out: Path) -> dict[str, Any]:
    """`python -m lm_eval` on the same model and tasks, its aggregated results file read back."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the device the stage used
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
         "--include_path", str(tasks_dir), "--tasks", ",".join(TASKS), "--num_fewshot", "1",
         "--limit", "12", "--batch_size", "4", "--device", device, "--output_path", str(out)],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text(encoding="utf-8"))


# Each `lm_eval` command indexes lm-eval's ~15,000 tasks (about 35 s here): the adapter (base
# model + peft + its tokenizer) runs in `make test`, the plain model only in the slow suite.
@pytest.mark.parametrize("model", [pytest.param("pretrain", marks=pytest.mark.slow), "lora"])
def test_numbers_equal_the_lm_eval_command_line(
    run: Path, tasks_dir: Path, tmp_path: Path, model: str
) -> None:
    ladder = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["ev"][model]
    pretrain = run / "pretrain" / "final"
    args = f"pretrained={pretrain},dtype=float32"
    if model == "lora":
        adapter = run / "lora" / "final"
        assert (adapter / "adapter_config.json").is_file()  # scored as an adapter, not merged
        args += f",peft={adapter},tokenizer={adapter}"
    # The convention names the command line this test runs.
    convention = ladder["toy_sentiment_mc/lm_eval_convention"]
    assert f"--model_args {args}" in convention
    cli = _cli_results(args, tasks_dir, tmp_path / "out")
    compared = 0
    for task in TASKS:
        for key, value in cli["results"][task].items():
            if "," not in key or "_stderr" in key:
                continue  # alias, name, sample_len; standard errors are in the convention
            assert isinstance(value, float)
            assert ladder[f"{task}/{key}"] == value, (task, key)
            compared += 1
        conv = ladder[f"{task}/lm_eval_convention"]
        assert f"task {task} version {cli['versions'][task]}" in conv
        assert f"{cli['n-samples'][task]['effective']} of " in conv
        assert "1-shot" in conv
    assert compared == 5  # acc, acc_norm; word/byte perplexity, bits per byte
    assert 0 <= ladder["toy_sentiment_mc/acc,none"] <= 1
    assert ladder["toy_corpus_ppl/word_perplexity,none"] > 1
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "toy_sentiment_mc/acc,none" in report and "lm-eval columns" in report


def test_validate_refuses_what_lm_eval_cannot_score(tmp_path: Path, tasks_dir: Path) -> None:
    """A prompted model (its template would be dropped, soft prompts misalign HFLM's logits) and
    a masked LM: exit 2 from `validate`, before anything runs."""
    base = RECIPE.format(tasks="toy_corpus_ppl", include=tasks_dir)
    prompted = base.replace(
        "  ev:\n",
        '  zs: {kind: prompt, method: zero_shot, from: pretrain, template: "{text}"}\n  ev:\n',
    ).replace("models: [pretrain, lora]", "models: [pretrain, zs]")
    masked = (
        base.replace("objective: clm", "objective: mlm")
        .replace("family: gpt2", "family: bert")
        .replace("models: [pretrain, lora]", "models: [pretrain]")
    )
    masked = masked[: masked.index("  lora:\n")] + masked[masked.index("  ev:\n") :]
    for name, text, message in [
        ("prompted", prompted, "lm_eval cannot score the prompted model 'zs'"),
        ("masked", masked, "lm_eval cannot score 'pretrain', a masked LM"),
    ]:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(text, encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "mlsteps", "validate", str(recipe)],
            env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr


def test_missing_include_path_fails_validate(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(tasks="t", include=tmp_path / "no-such-dir"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mlsteps", "validate", str(recipe)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "stages.ev.lm_eval.include_path" in proc.stderr and "is not a directory" in proc.stderr


@pytest.mark.slow  # an unknown name is looked up in lm-eval's full task index (about 35 s)
def test_unknown_task_is_exit_2(tmp_path: Path, tasks_dir: Path) -> None:
    """A misspelled task fails before any model is loaded, with lm-eval's names suggested."""
    from mlsteps.engine.harness import task_manager
    from mlsteps.errors import UserError, field_scope
    from mlsteps.recipe.specs.evaluate import LmEvalSpec

    spec = LmEvalSpec(tasks=["toy_sentiment_mx"], include_path=str(tasks_dir))
    with pytest.raises(UserError) as err:
        with field_scope("stages.ev"):
            task_manager(spec)
    assert "unknown lm-eval task 'toy_sentiment_mx'" in str(err.value)
    assert "toy_sentiment_mc" in str(err.value.hint)
    assert err.value.where == "stages.ev.lm_eval.tasks.0"


def test_task_files_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    """An edited task YAML under include_path re-runs the stage; no include_path, no change to
    the fingerprints other stages had."""
    from mlsteps.fingerprint import fingerprint
    from mlsteps.recipe.specs.evaluate import EvalSpec

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n", encoding="utf-8")
    spec = EvalSpec(kind="eval", models=["m"], lm_eval={"tasks": ["t"], "include_path": str(tasks)})
    before = fingerprint(spec, 0, {})
    (tasks / "t.yaml").write_text("task: t\nmetadata: {version: 2}\n", encoding="utf-8")
    assert fingerprint(spec, 0, {}) != before
    plain = EvalSpec(kind="eval", models=["m"], lm_eval={"tasks": ["t"]})
    assert plain.input_files() == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs 'metrics' (with 'data') or 'lm_eval'"),
        ({"metrics": ["perplexity"]}, "'metrics' are computed on 'data'"),
        ({"data": "builtin:toy/corpus", "lm_eval": {"tasks": ["t"]}}, "'data' is read only by"),
        ({"lm_eval": {"tasks": []}}, "at least 1 item"),
    ],
)
def test_eval_spec_needs_metrics_or_lm_eval(fields: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    from mlsteps.recipe.specs.evaluate import EvalSpec

    with pytest.raises(ValidationError, match=re.escape(message)):
        EvalSpec(kind="eval", models=["m"], **fields)


def test_validate_with_lm_eval_imports_nothing_heavy(tmp_path: Path, tasks_dir: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(tasks="toy_corpus_ppl", include=tasks_dir), encoding="utf-8")
    code = (
        "import sys\nfrom mlsteps.cli import main\n"
        f"try:\n    main(['validate', {str(recipe)!r}])\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('lm_eval', 'torch', 'transformers', 'datasets') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_report_describes_an_lm_eval_stage() -> None:
    from mlsteps.report.text import describe_stage

    only = {"kind": "eval", "models": ["a", "b"], "lm_eval": {"tasks": ["t1", "t2"]}}
    assert describe_stage(only) == "scores `a`, `b` on lm-eval tasks: t1, t2."
    both = {**only, "data": {"builtin": "toy/translate"}, "metrics": ["bleu"]}
    assert describe_stage(both).endswith(": bleu; lm-eval tasks t1, t2.")

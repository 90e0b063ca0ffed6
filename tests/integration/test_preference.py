"""`kind: preference` (TRL trainers through engine.training) and the preference_accuracy metric.

One tiny pipeline (tokenizer -> SFT on toy/translate -> DPO on toy/preference -> eval) is run once
per module; the tests check its files and numbers, resume after kill -9, the metric against TRL's
own log-probabilities, the other methods, and the recipe checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe

# The CLI runner and fault points of the reliability suite (as tests/unit/test_runner.py does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from relkit import cli, copy_run, loss_curve, read_json, spawn  # noqa: E402

RECIPE = """\
name: pref
seed: 3
defaults:
  train: {batch_size: 4, log_every_steps: 1, save_every_steps: 2, keep_checkpoints: 2,
          precision: fp32, warmup_steps: 0}
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/translate, max_samples: 600}
    text_column: [source, target]
    vocab_size: 300
  sft:
    kind: finetune
    task: causal_lm
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 128}
    tokenizer: tok
    data: {builtin: toy/translate, max_samples: 200}
    validation: {builtin: toy/translate, split: validation, max_samples: 8}
    template: "English: {source}\\nToy: "
    response_column: target
    max_seq_len: 64
    validation_max_samples: 2
    generation: {max_new_tokens: 4}
    train: {max_steps: 12, batch_size: 16, lr: 3.0e-3}
  dpo:
    kind: preference
    method: dpo
    from: sft
    data: {builtin: toy/preference, max_samples: 40}
    validation: {builtin: toy/preference, split: validation, max_samples: 8}
    max_seq_len: 128   # no pair is truncated (the metric test compares with TRL's sums)
    beta: 0.5
    train: {max_steps: 6, lr: 2.0e-3, eval_every_steps: 3}
  ev:
    kind: eval
    models: [sft, dpo]
    data: {builtin: toy/preference, split: test, max_samples: 24}
    metrics: [preference_accuracy]
"""


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "pref.yaml"
    path.write_text(RECIPE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, recipe_path: Path) -> Path:
    """One uninterrupted run of the whole pipeline."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # same reductions as the OMP_NUM_THREADS=1 subprocess below
    try:
        run_dir = tmp_path_factory.mktemp("ref") / "run"
        res = cli("run", recipe_path, "--run-dir", run_dir)
        assert res.code == 0, res.err[-3000:]
    finally:
        torch.set_num_threads(before)
    return run_dir


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_dpo_stage_files_metrics_and_report(reference: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = reference / "dpo"
    final = stage / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no mlsteps code
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "gpt2" and len(tokenizer) == 300
    # The SFT prompt template travels on, so eval/predict build the same inputs.
    assert (final / "mlsteps_prompt.json").is_file()
    # Steps 1..6 logged once each, with TRL's reward metrics under mlsteps names.
    records = _records(stage / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all("reward_margin" in r and "reward_accuracy" in r for r in train)
    val_steps = [r["step"] for r in records if "val_reward_accuracy" in r]
    assert val_steps == [0, 3, 6]
    # At step 0 the policy is its reference: every reward is exactly 0.
    start = next(r for r in records if r["step"] == 0)
    assert start["val_reward_margin"] == 0.0 and start["val_loss"] == pytest.approx(0.693147, 1e-5)

    metrics = read_json(reference / "metrics.json")
    dpo = metrics["dpo"]
    assert dpo["global_step"] == 6 and dpo["val_reward_accuracy_start"] == 0.0
    assert "DPO implicit reward" in dpo["reward_convention"]
    assert not any("logits" in k for k in dpo), "TRL diagnostics stay in metrics.jsonl"
    assert (stage / "rewards.png").is_file()
    report = (reference / "report.md").read_text(encoding="utf-8")
    assert "rewards.png" in report and "preference_accuracy" in report
    ladder = metrics["ev"]
    for label in ("sft", "dpo"):
        scores = ladder[label]
        assert scores["preference_pairs"] == 24
        for key in ("preference_accuracy", "preference_accuracy_normalized"):
            assert 0.0 <= scores[key] <= 1.0
            assert scores[key] * 24 == pytest.approx(round(scores[key] * 24))  # a share of 24
        assert "ties count as misses" in scores["preference_accuracy_convention"]


def test_metric_matches_trl_log_probs(reference: Path) -> None:
    """preference_accuracy scores the sequences TRL trained on: its log p(answer|prompt) sums
    of the SFT model equal DPOTrainer's logps/chosen and logps/rejected at step 0."""
    from mlsteps.builtin import load_builtin
    from mlsteps.engine.inference import load_for_inference
    from mlsteps.metrics.preference import pair_scores

    rows = load_builtin("toy/preference", "validation")[:8]
    loaded = load_for_inference(str(reference / "sft" / "final"))
    scores = pair_scores(
        loaded.model,
        loaded.tokenizer,
        [r["prompt"] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        batch_size=3,
    )
    start = next(r for r in _records(reference / "dpo" / "metrics.jsonl") if r["step"] == 0)
    mean_chosen = sum(s[0] for s in scores) / len(scores)
    mean_rejected = sum(s[2] for s in scores) / len(scores)
    assert mean_chosen == pytest.approx(start["val_logps_chosen"], rel=1e-5)
    assert mean_rejected == pytest.approx(start["val_logps_rejected"], rel=1e-5)
    # Not vacuous: the two answers are scored differently.
    assert abs(mean_chosen - mean_rejected) > 1e-3


def test_kill9_during_dpo_then_rerun_equals_uninterrupted(
    tmp_path: Path, recipe_path: Path, reference: Path
) -> None:
    """kill -9 while checkpoint-4 is being marked complete; the same command resumes from
    checkpoint-2 and ends with the uninterrupted run's losses, rewards and weights."""
    from safetensors.torch import load_file

    # A fresh run dir: a forced re-run (`--from dpo`) of a finished stage would be built aside
    # in .dpo.next/ and keep dpo/ intact (tests/reliability/test_trust_rundir.py covers that).
    run_dir = tmp_path / "run"
    cmd = ["run", recipe_path, "--run-dir", run_dir]
    proc = spawn(cmd, tmp_path, fault=r"/dpo/checkpoints/checkpoint-4/COMPLETE$", tag="kill")
    proc.wait_paused()
    proc.kill()
    assert read_json(run_dir / "state.json")["stages"]["dpo"]["status"] == "running"
    assert not (run_dir / "dpo" / "final").exists()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = cli("run", recipe_path, "--run-dir", run_dir)
    finally:
        torch.set_num_threads(before)
    assert res.code == 0, res.err[-3000:]
    assert "resuming from checkpoint-2" in res.err
    assert "[sft] up to date, skipped" in res.err

    ref_curve = loss_curve(reference / "dpo" / "metrics.jsonl")
    got_curve = loss_curve(run_dir / "dpo" / "metrics.jsonl")
    assert [s for s, _ in got_curve] == [1, 2, 3, 4, 5, 6]
    for (step, a), (_, b) in zip(ref_curve, got_curve, strict=True):
        assert a == pytest.approx(b, abs=1e-6), step
    ref_w = load_file(str(reference / "dpo" / "final" / "model.safetensors"))
    got_w = load_file(str(run_dir / "dpo" / "final" / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.allclose(ref_w[name], got_w[name], atol=1e-6, rtol=0), name
    ref_m, got_m = read_json(reference / "metrics.json"), read_json(run_dir / "metrics.json")
    for key in ("val_reward_accuracy", "val_reward_margin", "val_loss", "train_loss"):
        assert got_m["dpo"][key] == pytest.approx(ref_m["dpo"][key], abs=1e-6), key
    assert got_m["ev"]["dpo"]["preference_accuracy"] == ref_m["ev"]["dpo"]["preference_accuracy"]


def test_rerun_skips_a_finished_preference_stage(
    tmp_path: Path, recipe_path: Path, reference: Path
):
    run_dir = copy_run(reference, tmp_path / "run")
    res = cli("run", recipe_path, "--run-dir", run_dir)
    assert res.code == 0
    assert "[dpo] up to date, skipped" in res.err


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("orpo", {}),
        ("simpo", {"simpo_gamma": 0.3}),
        ("kto", {"data": {"builtin": "toy/kto", "max_samples": 16}}),
        ("dpo", {"tuning": "lora", "loss_type": "ipo", "sft_weight": 0.5}),
    ],
)
def test_other_methods_train_and_save(
    tmp_path: Path, reference: Path, method: str, extra: dict[str, Any]
) -> None:
    """Each TRL trainer runs through the mlsteps wrapper for two steps and leaves a loadable
    final/ (a plain model, or a peft adapter on the SFT model)."""
    from mlsteps.context import StageContext
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages import preference

    spec = PreferenceSpec.model_validate(
        {
            "kind": "preference", "method": method, "from": "sft",
            "data": {"builtin": "toy/preference", "max_samples": 16},
            "validation_fraction": 0.25, "max_seq_len": 128,
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every_steps": 1,
                      "precision": "fp32"},
            **extra,
        }
    )  # fmt: skip
    ctx = StageContext(
        run_dir=tmp_path, stage="pref", kind="preference", seed=0, quiet=True,
        upstream={"sft": reference / "sft" / "final"},
    )  # fmt: skip
    result = preference.run(spec, ctx)
    assert result.metrics["global_step"] == 2
    assert result.metrics["tokens_per_s"] > 0  # tokens counted for every trainer's batches
    train = [r for r in _records(ctx.metrics_path) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    final = ctx.final_dir
    if extra.get("tuning") == "lora":
        from peft import AutoPeftModelForCausalLM

        cfg = json.loads((final / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(reference / "sft" / "final")
        assert not (final / "ref").exists(), "TRL's reference adapter copy is not saved"
        AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)


# ---------------------------------------------------------------- recipe checks (no torch)

BASE = {"kind": "preference", "from": "gpt2", "data": "builtin:toy/preference"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "orpo", "reference": "gpt2"}, "reference-free"),
        ({"method": "dpo", "reference": "none"}, "needs a reference"),
        ({"method": "kto", "loss_type": "ipo"}, "only applies to method dpo"),
        ({"method": "dpo", "loss_type": "sigmoidd"}, "did you mean 'sigmoid'"),
        ({"method": "dpo", "simpo_gamma": 0.5}, "only applies to method simpo"),
        ({"method": "orpo", "sft_weight": 1.0}, "only applies to method dpo"),
        ({"method": "dpo", "sft_weight": -1.0}, "sft_weight"),
        ({"method": "dpo", "beta": True}, "beta"),
        ({"method": "dpo", "beta": float("inf")}, "beta"),
        ({"method": "dpo", "beta": 0}, "beta"),
        ({"method": "kto", "chosen_column": "good"}, "does not apply to method kto"),
        ({"method": "dpo", "label_column": "y"}, "does not apply to method dpo"),
        ({"method": "dpo", "merge": True}, "only applies to tuning: lora"),
        ({"method": "dpo", "lora": {"r": 4}}, "only apply to tuning: lora"),
        ({"method": "dpo", "chat_template": "chatmll"}, "neither a builtin name"),
        ({"method": "dpo", "chat_template": "{% for m in messages %}"}, "not valid Jinja"),
        ({"method": "rlhf"}, "method"),
    ],
)
def test_bad_preference_recipes_are_refused(fields: dict[str, Any], message: str) -> None:
    raw = {"name": "x", "stages": {"p": {**BASE, **fields}}}
    with pytest.raises(UserError) as err:
        validate_recipe(raw)
    assert message in str(err.value) + str(err.value.hint or ""), str(err.value)
    assert "stages.p" in str(err.value.where or "") + str(err.value)


def test_eval_pair_columns_need_the_metric() -> None:
    raw = {
        "name": "x",
        "stages": {
            "e": {"kind": "eval", "models": ["gpt2"], "data": "builtin:toy/preference",
                  "metrics": ["bleu"], "chosen_column": "good"},
        },
    }  # fmt: skip
    with pytest.raises(UserError, match="only applies to the metric preference_accuracy"):
        validate_recipe(raw)


def test_bad_kto_label_is_a_user_error(tmp_path: Path, reference: Path) -> None:
    from mlsteps.context import StageContext
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages import preference

    data = tmp_path / "kto.jsonl"
    rows = [
        {"prompt": "a", "completion": "b", "label": "true"},
        {"prompt": "c", "completion": "d", "label": "maybe"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = PreferenceSpec.model_validate(
        {"kind": "preference", "method": "kto", "from": "sft", "data": str(data),
         "validation_fraction": 0}
    )  # fmt: skip
    ctx = StageContext(
        run_dir=tmp_path, stage="p", kind="preference", seed=0, quiet=True,
        upstream={"sft": reference / "sft" / "final"},
    )  # fmt: skip
    with pytest.raises(UserError, match="column 'label' row 1 is 'maybe', expected true or false"):
        preference.run(spec, ctx)
    assert not ctx.final_dir.exists()


# ---------------------------------------------------------------- builtin alignment data


def test_builtin_alignment_sets_follow_the_translate_splits() -> None:
    """Each split derives from the same split of toy/translate (no test sentence leaks into
    training), rows in the same order, deterministic, with fluent corruptions."""
    from mlsteps.builtin import SPLITS, list_builtin, load_builtin
    from mlsteps.builtin.alignment import WORD_CLASS

    infos = {i.name: i for i in list_builtin()}
    for name in ("toy/chat", "toy/preference", "toy/chat_preference", "toy/kto"):
        assert infos[name].split_sizes == infos["toy/translate"].split_sizes
    for split in SPLITS:
        source = load_builtin("toy/translate", split)
        pref = load_builtin("toy/preference", split)
        assert pref == load_builtin("toy/preference", split)
        assert [r["source"] for r in pref] == [r["source"] for r in source]
        for row in pref:
            assert row["chosen"] == row["target"] != row["rejected"]
            assert row["prompt"] == f"English: {row['source']}\nToy: "
            good, bad = (
                row["chosen"].rstrip(".").lower().split(),
                row["rejected"].rstrip(".").lower().split(),
            )
            assert all(w in WORD_CLASS for w in bad), "only words of the language"
            if row["corruption"] == "wrong_word":
                diff = [(a, b) for a, b in zip(good, bad, strict=True) if a != b]
                assert len(diff) == 1 and WORD_CLASS[diff[0][0]] == WORD_CLASS[diff[0][1]]
            elif row["corruption"] == "wrong_order":
                assert sorted(good) == sorted(bad)
            else:
                assert good[: len(bad)] == bad and 1 <= len(good) - len(bad) <= 2
        chat = load_builtin("toy/chat", split)
        for row, src in zip(chat, source, strict=True):
            turns = [m for m in row["messages"] if m["role"] != "system"]
            assert [m["role"] for m in turns] in (
                ["user", "assistant"] * 1,
                ["user", "assistant"] * 2,
            )
            assert turns[1]["content"] == src["target"]
        conv = load_builtin("toy/chat_preference", split)
        for row, p in zip(conv, pref, strict=True):
            assert row["chosen"][0] == row["rejected"][0] and row["chosen"][0]["role"] == "user"
            assert row["chosen"][1]["content"] == p["chosen"]
        kto = load_builtin("toy/kto", split)
        assert [r["label"] for r in kto[:4]] == [True, False, True, False]
    kinds = {r["corruption"] for r in load_builtin("toy/preference", "test")}
    assert kinds == {"wrong_word", "wrong_order", "truncated"}


def test_whole_conversation_pairs_get_their_shared_turns_as_prompt() -> None:
    import datasets

    from mlsteps.builtin import load_builtin
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages.preference import to_trl_rows

    rows = load_builtin("toy/chat_preference", "validation")[:3]
    spec = PreferenceSpec.model_validate(
        {"kind": "preference", "method": "dpo", "from": "x", "data": "builtin:toy/chat_preference"}
    )
    out, conversational = to_trl_rows(datasets.Dataset.from_list(rows), spec)
    assert conversational
    assert out[0]["prompt"] == [rows[0]["chosen"][0]]
    assert out[0]["chosen"] == [rows[0]["chosen"][1]] and out[0]["rejected"] == [
        rows[0]["rejected"][1]
    ]
    same = [
        {
            "chosen": [{"role": "user", "content": "a"}],
            "rejected": [{"role": "user", "content": "b"}],
        }
    ]
    with pytest.raises(UserError, match="share no opening turns"):
        to_trl_rows(datasets.Dataset.from_list(same), spec)


def test_nan_guard_stops_preference_training(tmp_path: Path, reference: Path) -> None:
    """The NaN guard of engine.training applies to the TRL trainer: a non-finite loss stops
    before the update, no checkpoint and no final/ are written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlsteps.context import StageContext
    from mlsteps.errors import StageFailed
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages import preference

    src = reference / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(src).save_pretrained(bad)
    spec = PreferenceSpec.model_validate(
        {"kind": "preference", "method": "dpo", "from": str(bad),
         "data": {"builtin": "toy/preference", "max_samples": 8}, "validation_fraction": 0,
         "max_seq_len": 128, "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"}}
    )  # fmt: skip
    ctx = StageContext(run_dir=tmp_path, stage="p", kind="preference", seed=0, quiet=True)
    with pytest.raises(StageFailed, match="training loss became nan at step 1"):
        preference.run(spec, ctx)
    assert not ctx.final_dir.exists()
    assert not list(ctx.checkpoints_dir.glob("checkpoint-*"))

"""A miniature of bench/ladder.py on builtin data (toy/sentiment), through the runner.

A tiny GPT-2 (2 layers, width 32) pretrained for a few steps on the training text, then
calibrated few-shot prompting and soft prompt tuning through the verbalizer, scored in one eval
ladder that must end with the majority baseline of the eval labels.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from mlsteps.recipe import validate_recipe
from mlsteps.runner import run_recipe

SENT = {"builtin": "toy/sentiment"}
VERBALIZER = {"positive": "good", "negative": "bad"}
TEMPLATE = "{text} It was"


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, int]]]:
    """The recipe run once, single-threaded; with every label scoring (first prompt, count)."""
    from mlsteps.prompt import calibration

    calls: list[tuple[str, int]] = []
    real = calibration.label_logprobs

    def counting(model: Any, tokenizer: Any, prompts: Any, *args: Any, **kw: Any) -> Any:
        calls.append((prompts[0], len(prompts)))
        return real(model, tokenizer, prompts, *args, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("ladder") / "run"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(calibration, "label_logprobs", counting)
            result = run_recipe(validate_recipe(_recipe()), run_dir, quiet=True)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0
    return run_dir, calls


def _recipe() -> dict[str, Any]:
    quick = {"batch_size": 16, "save_every_steps": 1000, "log_every_steps": 5}
    test = {
        "kind": "eval",
        "data": {**SENT, "split": "test", "max_samples": 60},
        "input_column": "text",
        "metrics": ["accuracy", "f1"],
    }
    prompt = {
        "kind": "prompt",
        "from": "lm",
        "task": "classification",
        "template": TEMPLATE,
        "verbalizer": VERBALIZER,
        "target_column": "label",
    }
    return {
        "name": "ladder-small",
        "seed": 0,
        "stages": {
            "tok": {"kind": "tokenizer", "data": SENT, "vocab_size": 400, "target": "clm"},
            "lm": {
                "kind": "pretrain",
                "tokenizer": "tok",
                "data": SENT,
                "model": {
                    "family": "gpt2",
                    "n_layers": 2,
                    "hidden_size": 32,
                    "n_heads": 2,
                    "max_positions": 128,
                },
                "max_seq_len": 64,
                "train": {**quick, "max_steps": 40, "lr": 3e-3},
            },  # fmt: skip
            "few_shot": {
                **prompt,
                "method": "few_shot",
                "shots": 2,
                "data": {**SENT, "max_samples": 50},
            },  # fmt: skip
            "soft": {
                **prompt,
                "method": "prompt_tuning",
                "num_virtual_tokens": 4,
                "data": {**SENT, "max_samples": 300},
                "validation": {**SENT, "split": "validation", "max_samples": 40},
                "train": {**quick, "max_steps": 30, "lr": 3e-2},
            },
            # The same weights, prompts and verbalizer as few_shot, another calibration; and a
            # zero-shot model with the very prompts the soft prompt sees.
            "few_raw": {
                **prompt,
                "method": "few_shot",
                "shots": 2,
                "data": {**SENT, "max_samples": 50},
                "calibration": "none",
            },
            "zero": {**prompt, "method": "zero_shot"},
            "test": {**test, "models": ["few_shot", "few_raw", "zero", "soft"]},
            "alone": {**test, "models": ["few_raw"]},
        },
    }


def test_small_ladder_runs_with_calibration_and_majority_baseline(
    ladder_run: tuple[Path, list[tuple[str, int]]],
) -> None:
    run_dir = ladder_run[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ladder = metrics["test"]
    assert list(ladder) == ["few_shot", "few_raw", "zero", "soft", "majority_baseline"]

    records = [json.loads(line) for line in (run_dir / "test" / "predictions.jsonl").open()]
    gold = [r["label"] for r in records if r["model"] == "soft"]
    top, count = Counter(gold).most_common(1)[0]
    assert ladder["majority_baseline"]["majority_label"] == top
    assert ladder["majority_baseline"]["accuracy"] == pytest.approx(count / len(gold))
    for model in ("few_shot", "soft"):
        rows = [r for r in records if r["model"] == model]
        hits = sum(r["predicted_label"] == r["label"] for r in rows)
        assert ladder[model]["accuracy"] == pytest.approx(hits / len(rows))

    # Hard prompts default to contextual calibration; soft prompts to none (trained through it).
    few = json.loads((run_dir / "few_shot" / "final" / "mlsteps_prompt.json").read_text())
    soft = json.loads((run_dir / "soft" / "final" / "mlsteps_prompt.json").read_text())
    assert (few["calibration"], soft["calibration"]) == ("contextual", "none")

    # The soft prompt trains on the cross-entropy over the two verbalizer words: its loss starts
    # near ln 2 (a 2-way guess), not near a language-model loss over the whole vocabulary.
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "soft" / "metrics.jsonl").open()
        if "loss" in json.loads(line)
    ]
    assert losses and abs(losses[0] - math.log(2)) < 0.35
    assert losses[-1] < losses[0]


def test_unigram_perplexity_matches_brute_force() -> None:
    """The pretrain stage's context-free reference (unigram_val_perplexity), by hand."""
    import datasets

    from mlsteps.stages.pretrain.lm_data import unigram_perplexity

    train = datasets.Dataset.from_dict({"input_ids": [[0, 5, 5, 6, 1], [0, 7, 5, 1]]})
    val = datasets.Dataset.from_dict({"input_ids": [[0, 5, 6, 9, 1]]})
    vocab, special = 10, [0, 1]
    counts = Counter(t for row in train["input_ids"] for t in row if t not in special)
    kept = [t for t in range(vocab) if t not in special]
    total = sum(counts[t] + 1 for t in kept)  # add-one smoothing over the non-special ids
    val_tokens = [t for t in val["input_ids"][0] if t not in special]
    nll = -sum(math.log((counts[t] + 1) / total) for t in val_tokens) / len(val_tokens)
    got = unigram_perplexity(train, val, vocab, skip_ids=special)
    assert got == pytest.approx(math.exp(nll), rel=1e-12)


def test_calibrations_of_one_model_share_its_label_scores(
    ladder_run: tuple[Path, list[tuple[str, int]]],
) -> None:
    """Zero- or few-shot prompts of the same weights differ only in their calibration: the eval
    stage scores the prompts once and reuses them, with the decisions of a model scored alone.
    A soft prompt (weights of its own) with the very same prompts as the zero-shot model is not
    reused."""
    run_dir, calls = ladder_run
    n_rows = 60
    scored = [first for first, n in calls if n == n_rows]
    # test: few_shot scores, few_raw reuses them, zero and soft score their own; alone: few_raw.
    assert len(scored) == 4
    assert scored[1] == scored[2]  # zero and soft scored the same prompts, each with its weights
    assert scored[3] == scored[0]  # the stage alone scored few_raw's (= few_shot's) prompts
    records = [json.loads(line) for line in (run_dir / "test" / "predictions.jsonl").open()]
    alone = [json.loads(line) for line in (run_dir / "alone" / "predictions.jsonl").open()]
    shared = [r["predicted_label"] for r in records if r["model"] == "few_raw"]
    assert shared == [r["predicted_label"] for r in alone]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["few_raw"] == metrics["alone"]["few_raw"]
    # Calibration still decides per model: contextual and none differ on this biased tiny model.
    calibrated = [r["predicted_label"] for r in records if r["model"] == "few_shot"]
    assert calibrated != shared

"""The modernbert family: a masked LM built from config that pretrains, fine-tunes (full and
LoRA), evaluates and predicts like bert (issue 15: a small bert sits on the MLM plateau for
thousands of steps; pre-norm + rotary positions leave it in hundreds, docs/quickstart.md).

The pipeline is the real one on a tiny model (2 layers, hidden 32): tokenizer -> MLM pretrain ->
LoRA and full classification -> eval -> predict; the adapter is reloaded under three seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe
from mlsteps.runner import run_recipe
from tests.integration.helpers import adapter_logits

ARCH = {"family": "modernbert", "n_layers": 2, "hidden_size": 32, "n_heads": 2,
        "max_positions": 64}  # fmt: skip
TOPIC = {"builtin": "toy/topic", "rows": ":200"}
RECIPE = {
    "name": "modernbert",
    "seed": 5,
    "defaults": {"train": {"save_every_steps": 1000, "log_every_steps": 5}},
    "stages": {
        "tok": {"kind": "tokenizer", "data": {"builtin": "toy/topic", "rows": ":400"},
                "vocab_size": 300, "target": "mlm"},
        "pre": {"kind": "pretrain", "objective": "mlm", "tokenizer": "tok", "model": ARCH,
                "data": {"builtin": "toy/topic", "rows": ":400"}, "max_seq_len": 32,
                "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "eval_every_steps": 8}},
        "lora": {"kind": "finetune", "task": "classification", "from": "pre", "method": "lora",
                 "data": TOPIC, "validation_fraction": 0.0, "text_column": "text",
                 "max_seq_len": 32, "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2}},
        "full": {"kind": "finetune", "task": "classification", "from": "pre", "data": TOPIC,
                 "validation_fraction": 0.0, "text_column": "text", "max_seq_len": 32,
                 "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3}},
        "test": {"kind": "eval", "models": ["lora", "full"],
                 "data": {"builtin": "toy/topic", "split": "test", "max_samples": 24},
                 "input_column": "text", "metrics": ["accuracy", "f1"]},
        "mlm_eval": {"kind": "eval", "models": ["pre"],
                     "data": {"builtin": "toy/topic", "split": "test", "max_samples": 24},
                     "text_column": "text", "metrics": ["pseudo_perplexity"]},
        "pred": {"kind": "predict", "model": "lora",
                 "data": {"builtin": "toy/topic", "split": "test", "max_samples": 12},
                 "input_column": "text"},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("modernbert") / "run"
    run_recipe(validate_recipe(json.loads(json.dumps(RECIPE))), root, quiet=True)
    return root


def test_pretrain_records_its_perplexity_next_to_the_unigram_reference(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pre = metrics["pre"]
    assert math.isfinite(pre["val_perplexity"]) and pre["val_perplexity"] > 1
    assert pre["unigram_val_perplexity"] > 1
    config = json.loads((run_dir / "pre" / "final" / "config.json").read_text())
    assert config["model_type"] == "modernbert"
    # Pseudo-perplexity reads the full logits: sparse MLM prediction applies only with labels.
    assert math.isfinite(metrics["mlm_eval"]["pre"]["pseudo_perplexity"])


def test_lora_adapter_saves_the_new_head_and_reloads_identically(run_dir: Path) -> None:
    adapter = run_dir / "lora" / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "Wqkv" in config["target_modules"] and "Wo" in config["target_modules"]
    assert {"head", "classifier"} <= set(config["modules_to_save"]), config["modules_to_save"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(".head." in k for k in saved) and any("classifier" in k for k in saved)
    texts = ["It rained all day.", "The cat sleeps."]
    first, second, third = (
        adapter_logits(adapter, seed, texts, without=("token_type_ids",)) for seed in (0, 1, 999)
    )
    assert torch.equal(first, second) and torch.equal(first, third)


def test_eval_and_predict_score_the_classifiers(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for model in ("lora", "full"):
        assert 0.0 <= metrics["test"][model]["accuracy"] <= 1.0
    rows = [
        json.loads(x) for x in (run_dir / "pred" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 12
    for row in rows:
        assert math.fsum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-12)


def test_modernbert_cannot_pretrain_a_causal_lm() -> None:
    bad = json.loads(json.dumps(RECIPE))
    bad["stages"]["pre"]["objective"] = "clm"
    with pytest.raises(UserError, match="decoder family"):
        validate_recipe(bad)

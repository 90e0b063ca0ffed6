"""A LoRA classification adapter saves every module fine-tuning created (issue 15).

The project's own MLM-pretrained BERT has no pooler (BertForMaskedLM is built without one), so
loading it for sequence classification initialises a new random pooler next to the new
classifier. When only the classifier was saved with the adapter, every later load drew another
random pooler: predictions depended on the load seed and the adapter scored the majority
baseline. The run here is the real pipeline (tokenizer -> MLM pretrain -> LoRA classification)
on a tiny BERT built from config; the adapter is then loaded three times under three seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlsteps.recipe import validate_recipe
from mlsteps.runner import run_recipe
from tests.integration.helpers import adapter_logits

RECIPE = {
    "name": "lora-heads",
    "seed": 3,
    "defaults": {"train": {"save_every_steps": 1000, "log_every_steps": 5}},
    "stages": {
        "tok": {
            "kind": "tokenizer",
            "data": {"builtin": "toy/topic", "rows": ":400"},
            "vocab_size": 300,
            "target": "mlm",
        },
        "pre": {
            "kind": "pretrain",
            "objective": "mlm",
            "tokenizer": "tok",
            "model": {"family": "bert", "n_layers": 2, "hidden_size": 32, "n_heads": 2,
                      "max_positions": 64},
            "data": {"builtin": "toy/topic", "rows": ":400"},
            "max_seq_len": 32,
            "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3},
        },
        "cls": {
            "kind": "finetune",
            "task": "classification",
            "from": "pre",
            "method": "lora",
            "data": {"builtin": "toy/topic", "rows": ":200"},
            "validation_fraction": 0.0,
            "text_column": "text",
            "max_seq_len": 32,
            "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2},
        },
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora_heads")
    run_recipe(validate_recipe(json.loads(json.dumps(RECIPE))), root / "run", quiet=True)
    return root / "run"


TEXTS = [
    "It rained all day in the town.",
    "The cat sleeps next to the dog.",
    "We ate bread and soup for dinner.",
    "She took the train to the coast.",
    "He works at the mill every morning.",
    "Snow fell on the hills.",
]


def test_adapter_predictions_do_not_depend_on_the_load_seed(run_dir: Path) -> None:
    adapter = run_dir / "cls" / "final"
    assert (adapter / "adapter_config.json").is_file()
    # The base really lacks a pooler: it is one of the modules fine-tuning created.
    with safe_open(str(run_dir / "pre" / "final" / "model.safetensors"), "pt") as f:
        assert not any("pooler" in k for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert any("pooler" in m for m in config["modules_to_save"]), config["modules_to_save"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any("pooler" in k for k in saved) and any("classifier" in k for k in saved)

    first, second, third = (adapter_logits(adapter, seed, TEXTS) for seed in (0, 1, 12345))
    assert torch.equal(first, second) and torch.equal(first, third)
    assert not torch.allclose(first[0], first[1])  # the inputs give different outputs

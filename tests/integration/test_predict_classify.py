"""predict on sequence classifiers, validate refusing stage/model combinations that cannot
work, and the generation knobs repetition_penalty / no_repeat_ngram_size (issue 15).

The classifiers are the real pipeline on a tiny BERT: tokenizer -> MLM pretrain -> full
classification, LoRA adapter and merged LoRA (same seed: the same training) -> predict.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel

from mlsteps.cli import main
from mlsteps.engine.generation import generate
from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe
from mlsteps.recipe.specs.model import GenerationSpec
from mlsteps.runner import run_recipe

TOPIC = {"builtin": "toy/topic", "rows": ":200"}
TEST = {"builtin": "toy/topic", "split": "test", "rows": ":24"}
_CLS = {
    "kind": "finetune",
    "task": "classification",
    "from": "pre",
    "data": TOPIC,
    "validation_fraction": 0.0,
    "max_seq_len": 48,  # cuts some examples: the truncation count is checked below
    "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-2},
}
RECIPE: dict[str, Any] = {
    "name": "predict-classify",
    "seed": 5,
    "defaults": {"train": {"save_every_steps": 1000, "log_every_steps": 4}},
    "stages": {
        "tok": {"kind": "tokenizer", "data": TOPIC, "vocab_size": 300, "target": "mlm"},
        "pre": {
            "kind": "pretrain",
            "objective": "mlm",
            "tokenizer": "tok",
            "model": {"family": "bert", "n_layers": 2, "hidden_size": 32, "n_heads": 2,
                      "max_positions": 64},
            "data": TOPIC,
            "max_seq_len": 32,
            "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3},
        },
        "full": _CLS,
        "lora": {**_CLS, "method": "lora"},
        "merged": {**_CLS, "method": "lora", "merge": True},
        "p_full": {"kind": "predict", "model": "full", "data": TEST, "input_column": "text",
                   "reference_column": "label"},
        "p_lora": {"kind": "predict", "model": "lora", "data": TEST, "input_column": "text"},
        "p_merged": {"kind": "predict", "model": "merged", "data": TEST, "input_column": "text"},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict_classify") / "run"
    run_recipe(validate_recipe(copy.deepcopy(RECIPE)), root, quiet=True)
    return root


def _rows(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    lines = (run_dir / stage / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("stage", ["p_full", "p_lora", "p_merged"])
def test_predict_writes_labels_with_probabilities(run_dir: Path, stage: str) -> None:
    from mlsteps.builtin import load_builtin

    rows = _rows(run_dir, stage)
    texts = [r["text"] for r in load_builtin("toy/topic", "test")][:24]
    assert [r["index"] for r in rows] == list(range(24))
    assert [r["input"] for r in rows] == texts
    labels = {"weather", "food", "animals", "travel", "work"}
    for r in rows:
        probs = r["probabilities"]
        assert set(probs) == labels
        assert math.fsum(probs.values()) == pytest.approx(1.0, abs=1e-12)
        assert r["label"] == max(probs, key=probs.__getitem__)
    if stage == "p_full":
        gold = [r["label"] for r in load_builtin("toy/topic", "test")][:24]
        assert [r["reference"] for r in rows] == gold
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[stage]["predictions"] == 24


def test_adapter_predicts_like_its_merged_twin(run_dir: Path) -> None:
    """Same seed, same training: the adapter (base + LoRA + saved new modules) and the merged
    model give the same probabilities up to the float32 rounding of the merge."""
    adapter, merged = _rows(run_dir, "p_lora"), _rows(run_dir, "p_merged")
    assert [r["label"] for r in adapter] == [r["label"] for r in merged]
    for a, m in zip(adapter, merged, strict=True):
        for label, p in a["probabilities"].items():
            assert p == pytest.approx(m["probabilities"][label], abs=1e-5)


def test_predict_labels_equal_eval_labels(run_dir: Path) -> None:
    from mlsteps.engine.inference import load_for_inference, predict_labels

    rows = _rows(run_dir, "p_full")
    loaded = load_for_inference(str(run_dir / "full" / "final"))
    assert predict_labels(loaded, [r["input"] for r in rows], batch_size=5) == [
        r["label"] for r in rows
    ]


# ---------------------------------------------------------------- validate


def _validate_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str], stages: dict) -> str:
    import yaml

    recipe = {"name": "v", "stages": stages}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err


BASE = {
    "tok": {"kind": "tokenizer", "data": "builtin:toy/corpus", "target": "mlm"},
    "mlm": {"kind": "pretrain", "objective": "mlm", "tokenizer": "tok", "data": "builtin:toy/corpus",
            "model": {"family": "bert"}},
    "clm": {"kind": "pretrain", "objective": "clm", "tokenizer": "tok", "data": "builtin:toy/corpus",
            "model": {"family": "gpt2"}},
    "cls": {"kind": "finetune", "task": "classification", "from": "mlm",
            "data": "builtin:toy/topic", "method": "lora"},
}  # fmt: skip

IMPOSSIBLE = [
    ({"kind": "predict", "model": "mlm", "data": "builtin:toy/topic"}, "stages.x.model",
     "masked LM"),
    ({"kind": "predict", "model": "tok", "data": "builtin:toy/topic"}, "stages.x.model",
     "tokenizer"),
    ({"kind": "eval", "models": ["clm", "cls"], "data": "builtin:toy/translate",
      "metrics": ["bleu"]},
     "stages.x.models.1", "metric 'bleu' does not fit model 'cls', a sequence classifier"),
    ({"kind": "eval", "models": ["mlm"], "data": "builtin:toy/topic", "metrics": ["perplexity"]},
     "stages.x.models.0", "masked LM"),
    ({"kind": "finetune", "task": "seq2seq", "from": "clm", "data": "builtin:toy/translate"},
     "stages.x.from", "encoder-decoder"),
    ({"kind": "finetune", "task": "causal_lm", "from": "cls", "data": "builtin:toy/translate",
      "template": "{source}", "response_column": "target"}, "stages.x.from", "decoder model"),
    ({"kind": "prompt", "method": "zero_shot", "from": "cls"}, "stages.x.from", "generates text"),
    ({"kind": "pretrain", "objective": "clm", "from": "mlm", "data": "builtin:toy/corpus"},
     "stages.x.from", "objective clm"),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "where", "needle"), IMPOSSIBLE)
def test_validate_refuses_impossible_model_for_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: dict, where: str, needle: str
) -> None:
    err = _validate_exit(tmp_path, capsys, {**BASE, "x": stage})
    assert needle in err and where in err, err


def test_validate_accepts_what_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    stages = {
        **BASE,
        "p": {"kind": "predict", "model": "cls", "data": "builtin:toy/topic"},
        "e": {"kind": "eval", "models": ["cls"], "data": "builtin:toy/topic",
              "metrics": ["accuracy", "f1"]},
        "e2": {"kind": "eval", "models": ["clm", "some/hub-model"], "data": "builtin:toy/corpus",
               "metrics": ["perplexity"]},
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "v", "stages": stages}, sort_keys=False), "utf-8")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(path)])
    assert info.value.code == 0, capsys.readouterr().err
    validate_recipe(copy.deepcopy(RECIPE))


# ---------------------------------------------------------------- generation knobs


@pytest.mark.parametrize(
    ("field", "value"),
    [("repetition_penalty", 0), ("repetition_penalty", -1.5), ("no_repeat_ngram_size", -1)],
)
def test_generation_knob_ranges(field: str, value: float) -> None:
    assert getattr(GenerationSpec.model_validate({field: 2}), field) == 2
    with pytest.raises(ValidationError, match="greater than"):
        GenerationSpec.model_validate({field: value})
    spec = {"kind": "predict", "model": "gpt2", "data": "x.txt", "generation": {field: value}}
    with pytest.raises(UserError, match=f"stages.p.generation.{field}"):
        validate_recipe({"name": "v", "stages": {"p": spec}})


@pytest.fixture(scope="module")
def looping_model() -> tuple[Any, Any]:
    """A random tiny gpt2: greedy decoding repeats itself, which is what the knobs are for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat dog sat on mat a and ran far to house red big small".split()
    vocab = {"<eos>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(vocab), n_layer=2, n_embd=32, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    # Never stop early: the whole budget of new tokens is generated.
    with torch.no_grad():
        model.lm_head.weight[0] -= 100.0
    return model, tokenizer


def test_no_repeat_ngram_size_and_repetition_penalty_reach_generate(looping_model) -> None:
    model, tokenizer = looping_model
    prompts = ["the cat sat", "a big dog ran to the"]

    def run(**knobs: Any) -> list[list[str]]:
        spec = GenerationSpec.model_validate({"max_new_tokens": 12, **knobs})
        return [t.split() for t in generate(model, tokenizer, prompts, spec, seed=0)]

    plain = run()
    assert any(len(set(words)) < len(words) for words in plain)  # the model loops
    for prompt, words in zip(prompts, run(no_repeat_ngram_size=2), strict=True):
        seq = prompt.split() + words  # decoder-only: the prompt is part of the sequence
        bigrams = list(zip(seq, seq[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))
    for prompt, words in zip(prompts, run(no_repeat_ngram_size=1), strict=True):
        seq = prompt.split() + words
        assert len(seq) == len(set(seq))
    penalised = run(repetition_penalty=5.0)
    assert penalised != plain
    distinct = sum(len(set(w)) for w in penalised)
    assert distinct > sum(len(set(w)) for w in plain)


# ---------------------------------------------------------------- truncation counts


def test_truncated_examples_are_counted_and_reported(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mlsteps.builtin import load_builtin

    tok = AutoTokenizer.from_pretrained(run_dir / "full" / "final")
    texts = [r["text"] for r in load_builtin("toy/topic", "train")][:200]
    expected = sum(len(tok(t)["input_ids"]) > 48 for t in texts)
    assert 0 < expected < 200
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("full", "lora", "merged"):
        assert metrics[stage]["train_truncated_examples"] == expected
        assert metrics[stage]["train_truncated_share"] == pytest.approx(expected / 200)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"{expected} training examples truncated ({expected / 200:.1%})" in report


def test_seq2seq_and_sft_truncation_flags(looping_model) -> None:
    import datasets

    from mlsteps.recipe.specs.finetune import FinetuneSpec
    from mlsteps.stages.finetune import data as fd
    from mlsteps.stages.finetune import sft as fs

    _, tokenizer = looping_model
    rows = datasets.Dataset.from_list(
        [
            {"source": "the cat sat", "target": "a dog"},  # 3 + 2(+eos) tokens
            {"source": "the cat sat on the mat", "target": "a dog"},  # source 6 > 4
            {"source": "the cat", "target": "a big red dog ran"},  # target 5 + eos > 4
            {"source": "the", "target": "a b"},  # 'b' unknown -> <eos> id: still 2 + eos
        ]
    )
    base = {"kind": "finetune", "from": "x", "data": "x.jsonl"}
    s2s = FinetuneSpec.model_validate(
        {**base, "task": "seq2seq", "max_source_len": 4, "max_target_len": 4}
    )
    ds, cut = fd.pop_truncated(fd.tokenize_seq2seq(rows, tokenizer, s2s))
    assert cut == 2 and "truncated" not in ds.column_names
    sft = FinetuneSpec.model_validate(
        {**base, "task": "causal_lm", "prompt_column": "source", "response_column": "target",
         "max_seq_len": 7}
    )  # fmt: skip
    ds, cut = fd.pop_truncated(fs.tokenize_sft(rows, tokenizer, sft))
    # prompt + response + EOS: 6, 9, 8, 4 tokens; two exceed 7.
    assert cut == 2 and max(len(ids) for ids in ds["input_ids"]) == 7

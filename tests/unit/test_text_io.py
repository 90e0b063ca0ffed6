"""The shared writers and rules every stage uses: atomic JSONL files, the prompt file, and how
many positions a model can read (each had two to four copies before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsteps.positions import config_max_positions, max_positions
from mlsteps.prompt.prompter import PROMPT_FILE, Prompter, load_prompter, prompt_file, save_prompter
from mlsteps.text_io import atomic_write_jsonl


def test_jsonl_lines_roundtrip_with_non_ascii_kept(tmp_path: Path):
    records = [{"input": "你好", "prediction": "Grüße", "n": 1}, {"refs": ["a", "b"], "x": None}]
    path = atomic_write_jsonl(tmp_path / "sub" / "predictions.jsonl", iter(records))
    text = path.read_text(encoding="utf-8")
    assert "你好" in text and "\\u" not in text  # readable, not escaped
    assert [json.loads(line) for line in text.splitlines()] == records
    assert text.endswith("\n") and "\r" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.jsonl"]


def test_jsonl_values_json_cannot_hold_become_text(tmp_path: Path):
    path = atomic_write_jsonl(tmp_path / "p.jsonl", [{"path": tmp_path}])
    assert json.loads(path.read_text()) == {"path": str(tmp_path)}


def test_a_failed_write_keeps_the_previous_file_and_the_next_one_replaces_the_leftover(
    tmp_path: Path,
):
    path = atomic_write_jsonl(tmp_path / "p.jsonl", [{"v": 1}])

    def broken():
        yield {"v": 2}
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(path, broken())
    assert path.read_text() == '{"v": 1}\n'  # a reader never sees half a file
    assert (tmp_path / "p.jsonl.tmp").exists()
    atomic_write_jsonl(path, [{"v": 3}])
    assert path.read_text() == '{"v": 3}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_the_prompt_file_is_written_once_and_reads_back(tmp_path: Path):
    prompter = Prompter(method="finetune", template="Q: {question}\nA:", target_column="answer")
    final = tmp_path / "run" / "sft" / "final"
    files = prompt_file(prompter, final)
    assert list(files) == [PROMPT_FILE] and files[PROMPT_FILE].endswith("}\n")
    final.mkdir(parents=True)
    save_prompter(prompter, final)
    assert (final / PROMPT_FILE).read_text(encoding="utf-8") == files[PROMPT_FILE]
    loaded = load_prompter(final)
    assert loaded is not None
    assert (loaded.template, loaded.target_column) == (prompter.template, "answer")


def test_one_position_rule_for_every_family():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    assert config_max_positions(GPT2Config(n_positions=64)) == 64
    assert config_max_positions(BertConfig(max_position_embeddings=128)) == 128
    assert config_max_positions(LlamaConfig(max_position_embeddings=256)) == 256
    assert config_max_positions(T5Config()) is None  # relative positions: no limit
    # RoBERTa numbers positions from pad_token_id + 1: the hub's (pad 1) and the ones mlsteps
    # builds (table sized max_positions + pad + 1, pad 0 here) both read what they should.
    assert config_max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert config_max_positions(RobertaConfig(max_position_embeddings=65, pad_token_id=0)) == 64


def test_a_soft_prompt_takes_its_virtual_tokens_from_the_limit():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    model = GPT2LMHeadModel(config)
    assert max_positions(model) == 64
    prompt = peft.get_peft_model(
        model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    )
    assert max_positions(prompt) == 59
    lora = peft.get_peft_model(
        GPT2LMHeadModel(config), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"])
    )
    assert max_positions(lora) == 64

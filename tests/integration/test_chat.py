"""`finetune` with `task: chat`: conversations, chat templates saved with final/, loss on assistant
turns only; preference tuning and preference_accuracy on conversations.

The round trip: the tokens the model was trained on before its last answer equal what the saved
tokenizer's ``apply_chat_template(messages[:-1], add_generation_prompt=True)`` gives, so
transformers pipelines, vLLM and lm-eval --apply_chat_template feed it the training prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe

# The CLI runner and fault points of the reliability suite (as tests/unit/test_runner.py does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from relkit import cli, read_json  # noqa: E402

RECIPE = """\
name: chat
seed: 5
defaults:
  train: {batch_size: 8, log_every_steps: 1, save_every_steps: 100, precision: fp32}
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/translate, max_samples: 600}
    text_column: [source, target]
    vocab_size: 300
  chat:
    kind: finetune
    task: chat
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 256}
    tokenizer: tok
    chat_template: chatml
    data: {builtin: toy/chat, max_samples: 64}
    validation: {builtin: toy/chat, split: validation, max_samples: 6}
    max_seq_len: 256
    packing: true
    validation_max_samples: 3
    generation: {max_new_tokens: 8}
    train: {max_steps: 3, lr: 3.0e-3}
  dpo:
    kind: preference
    method: dpo
    from: chat
    data: {files: [PAIRS]}
    validation_fraction: 0.25
    max_seq_len: 256
    train: {max_steps: 2, batch_size: 4, lr: 1.0e-3}
  ev:
    kind: eval
    models: [chat, dpo]
    data: {files: [PAIRS]}
    metrics: [preference_accuracy]
  ev_chat:
    kind: eval
    models: [chat]
    data: {builtin: toy/chat, split: test, max_samples: 4}
    input_column: messages       # rendered with the model's template, up to the last answer
    reference_column: messages   # the text of the last assistant turn
    metrics: [bleu]
    generation: {max_new_tokens: 6}
  pred:
    kind: predict
    model: chat
    data: {builtin: toy/chat, split: test, max_samples: 3}
    input_column: messages
    reference_column: messages
    generation: {max_new_tokens: 6}
"""

SYSTEM = {"role": "system", "content": "You translate English into the Toy language."}


def _conversational_pairs(path: Path) -> Path:
    """prompt = a conversation, chosen/rejected = plain text (one assistant turn each)."""
    from mlsteps.builtin import load_builtin

    with path.open("w", encoding="utf-8") as f:
        for row in load_builtin("toy/preference", "train")[:16]:
            prompt = [SYSTEM, {"role": "user", "content": f"Translate into Toy: {row['source']}"}]
            f.write(json.dumps({"prompt": prompt, "chosen": row["chosen"],
                                "rejected": row["rejected"]}) + "\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    pairs = _conversational_pairs(root / "pairs.jsonl")
    recipe = root / "chat.yaml"
    recipe.write_text(RECIPE.replace("PAIRS", str(pairs)), encoding="utf-8")
    res = cli("run", recipe, "--run-dir", root / "run")
    assert res.code == 0, res.err[-3000:]
    return root / "run"


def _training_tokenizer(run_dir: Path) -> Any:
    """The tokenizer as the chat stage set it up (tok's tokenizer + chatml), rebuilt here."""
    from mlsteps.engine import chat_data
    from mlsteps.engine.modeling import ensure_pad_token, load_tokenizer

    tok = load_tokenizer(str(run_dir / "tok" / "final"))
    ensure_pad_token(tok)
    chat_data.set_template(tok, "chatml")
    return tok


def test_training_prompt_equals_saved_template_prompt(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mlsteps.builtin import load_builtin
    from mlsteps.stages.finetune.chat import encode_conversation
    from mlsteps.stages.finetune.data import IGNORE_INDEX

    saved = AutoTokenizer.from_pretrained(run_dir / "chat" / "final")
    assert "<|im_start|>" in saved.chat_template
    train_tok = _training_tokenizer(run_dir)
    checked = 0
    for row in load_builtin("toy/chat", "train")[:40]:
        messages = row["messages"]
        ids, labels = encode_conversation(train_tok, messages)
        start = max(i for i, x in enumerate(labels) if x == IGNORE_INDEX) + 1  # last answer
        expected = saved.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert ids[:start] == list(expected)
        # The whole conversation also matches the saved template token for token.
        full = saved.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(full)
        # Labels: the answers and their <|im_end|>, nothing of system/user turns or headers.
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        learned = saved.decode([t for t in labels if t != IGNORE_INDEX])
        assert learned == "".join(f"{a}<|im_end|>\n" for a in answers)
        checked += 1
    assert checked == 40


def test_chat_final_is_a_chat_model(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    final = run_dir / "chat" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # Generation stops at the end of the assistant turn, in any runtime reading these files.
    assert tok.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == end == model.generation_config.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 302
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    out = gen([{"role": "user", "content": "Translate into Toy: A dog sees the cat."}],
              max_new_tokens=4, do_sample=False)  # fmt: skip
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    metrics = read_json(run_dir / "metrics.json")["chat"]
    assert metrics["global_step"] == 3 and "val_bleu" in metrics


def test_preference_on_conversations(run_dir: Path) -> None:
    """DPO on conversational prompts: TRL applies the saved template; final/ keeps it; the
    metric scores through the same template (its sums equal TRL's at step 0)."""
    from transformers import AutoTokenizer

    from mlsteps.engine.inference import load_for_inference
    from mlsteps.metrics.preference import pair_scores

    saved = AutoTokenizer.from_pretrained(run_dir / "dpo" / "final")
    assert (
        saved.chat_template
        == AutoTokenizer.from_pretrained(run_dir / "chat" / "final").chat_template
    )
    ladder = read_json(run_dir / "metrics.json")["ev"]
    assert ladder["chat"]["preference_pairs"] == ladder["dpo"]["preference_pairs"] == 16
    records = [json.loads(x) for x in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["step"] == 0)
    # The validation rows: the held-out 25% of the 16 pairs, chosen as the stage chose them.
    import datasets

    from mlsteps.engine.data import split_validation

    rows = [json.loads(x) for x in (run_dir.parent / "pairs.jsonl").read_text().splitlines()]
    _, val = split_validation(datasets.Dataset.from_list(rows), 0.25, 5)
    assert val is not None
    loaded = load_for_inference(str(run_dir / "chat" / "final"))
    scores = pair_scores(
        loaded.model, loaded.tokenizer, val["prompt"], val["chosen"], val["rejected"]
    )
    mean_chosen = sum(s[0] for s in scores) / len(scores)
    assert mean_chosen == pytest.approx(start["val_logps_chosen"], rel=1e-5)


def test_eval_and_predict_render_conversations(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mlsteps.builtin import load_builtin

    tok = AutoTokenizer.from_pretrained(run_dir / "chat" / "final")
    rows = load_builtin("toy/chat", "test")[:4]
    records = [
        json.loads(x) for x in (run_dir / "ev_chat" / "predictions.jsonl").read_text().splitlines()
    ]
    for rec, row in zip(records, rows, strict=True):
        expected = tok.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, tokenize=False
        )
        assert rec["input"] == expected
        assert rec["reference"] == row["messages"][-1]["content"]
    assert read_json(run_dir / "metrics.json")["ev_chat"]["chat"]["bleu"] >= 0
    preds = [
        json.loads(x) for x in (run_dir / "pred" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["reference"] for p in preds] == [r["messages"][-1]["content"] for r in rows[:3]]
    assert all("<|im_end|>" not in p["prediction"] for p in preds)


def test_sharegpt_and_bad_conversations() -> None:
    from mlsteps.engine.chat_data import normalize_messages

    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    assert normalize_messages(turns, row=0, column="c") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    with pytest.raises(UserError, match="row 3 turn 0 has keys"):
        normalize_messages([{"speaker": "x"}], row=3, column="c")
    with pytest.raises(UserError, match="role 'bot'"):
        normalize_messages([{"role": "bot", "content": "x"}], row=0, column="c")
    with pytest.raises(UserError, match="expected a conversation"):
        normalize_messages("just text", row=0, column="c")


def test_conversation_without_answer_is_a_user_error(run_dir: Path) -> None:
    import datasets

    from mlsteps.stages.finetune.chat import tokenize_chat

    ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(UserError, match="row 0 has no assistant turn"):
        tokenize_chat(ds, _training_tokenizer(run_dir), "messages", 64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "causal_lm", "chat_template": "chatml"}, "it is for task chat"),
        ({"task": "causal_lm", "messages_column": "conv"}, "it is for task chat"),
        ({"task": "chat", "chat_template": "llama9"}, "neither a builtin name"),
        ({"task": "chat", "chat_template": "{{ messages"}, "not valid Jinja"),
    ],
)
def test_bad_chat_recipes_are_refused(fields: dict[str, Any], message: str) -> None:
    stage = {"kind": "finetune", "from": "gpt2", "data": "builtin:toy/chat", **fields}
    with pytest.raises(UserError) as err:
        validate_recipe({"name": "x", "stages": {"c": stage}})
    assert message in str(err.value)

"""Eval, predict and prompt stages on chat models: the tokens fed to the model are the saved
tokenizer's ``apply_chat_template(turns, add_generation_prompt=True)``.

The model's tokenizer adds a BOS of its own (like Llama's): a template-rendered prompt must not
get it a second time (apply_chat_template tokenises without the tokenizer's special tokens; the
template writes the ones it wants), while a plain-text prompt (``chat: false``) still gets it.
Every prompt that reaches ``generate`` is recorded in this process.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mlsteps.errors import UserError
from mlsteps.recipe import validate_recipe

# The in-process CLI runner of the reliability suite (as tests/integration/test_chat.py does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from relkit import cli, read_json  # noqa: E402

TOK = """\
name: tok
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/translate, max_samples: 600}
    text_column: [source, target]
    vocab_size: 300
"""

RECIPE = """\
name: chatprompt
seed: 11
defaults:
  train: {batch_size: 8, log_every_steps: 1, save_every_steps: 100, precision: fp32}
stages:
  chat:
    kind: finetune
    task: chat
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 512}
    tokenizer: BOS_TOK
    chat_template: chatml
    data: {builtin: toy/chat, max_samples: 32}
    validation: {builtin: toy/chat, split: validation, max_samples: 2}
    max_seq_len: 256
    generation: {max_new_tokens: 4}
    train: {max_steps: 2, lr: 3.0e-3}
  zero:
    kind: prompt
    method: zero_shot
    from: chat
    template: "Translate into Toy: {source}"
  few:
    kind: prompt
    method: few_shot
    from: chat
    data: {builtin: toy/translate, max_samples: 20}
    template: "Translate into Toy: {source}"
    shots: 2
  plain:
    kind: prompt
    method: zero_shot
    from: chat
    chat: false
    template: "Translate into Toy: {source}"
  ev_chat:
    kind: eval
    models: [chat]
    data: {builtin: toy/chat, split: test, max_samples: 3}
    input_column: messages
    reference_column: messages
    metrics: [bleu, response_perplexity]
    generation: {max_new_tokens: 4}
  ev_prompt:
    kind: eval
    models: [zero, few, plain]
    data: {builtin: toy/translate, split: test, max_samples: 3}
    reference_column: target
    metrics: [bleu]
    generation: {max_new_tokens: 4}
  pred:
    kind: predict
    model: few
    data: {builtin: toy/translate, split: test, max_samples: 3}
    reference_column: target
    generation: {max_new_tokens: 4}
"""


def _bos_tokenizer(tok_final: Path, out: Path) -> Path:
    """tok's tokenizer with a post-processor that puts <s> in front of every input."""
    from tokenizers import Tokenizer, processors

    shutil.copytree(tok_final, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The recipe run once in this process, every prompt given to generate() recorded."""
    from transformers.generation.utils import GenerationMixin

    root = tmp_path_factory.mktemp("chatprompt")
    (root / "tok.yaml").write_text(TOK, encoding="utf-8")
    res = cli("run", root / "tok.yaml", "--run-dir", root / "tokrun")
    assert res.code == 0, res.err[-3000:]
    bos_tok = _bos_tokenizer(root / "tokrun" / "tok" / "final", root / "bos_tok")
    recipe = root / "chatprompt.yaml"
    recipe.write_text(RECIPE.replace("BOS_TOK", str(bos_tok)), encoding="utf-8")

    fed: list[list[int]] = []
    original = GenerationMixin.generate

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        fed.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GenerationMixin, "generate", recording)
        res = cli("run", recipe, "--run-dir", root / "run")
    assert res.code == 0, res.err[-3000:]
    return {"dir": root / "run", "fed": fed, "err": res.err}


def _saved(run_dir: Path, stage: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / stage / "final")


def _template_ids(tok: Any, turns: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return list(out)


def _missing(fed: list[list[int]], expected: list[list[int]]) -> Counter[tuple[int, ...]]:
    """Expected prompts that never reached generate() (multiset difference)."""
    return Counter(map(tuple, expected)) - Counter(map(tuple, fed))


def test_the_tokenizer_adds_a_bos(run: dict[str, Any]) -> None:
    """Guard: the case under test is real (the tokenizer adds <s>; the template does not)."""
    tok = _saved(run["dir"], "chat")
    bos = tok.convert_tokens_to_ids("<s>")
    assert tok("Translate")["input_ids"][0] == bos
    assert _template_ids(tok, [{"role": "user", "content": "x"}])[0] != bos


def test_eval_of_conversations_feeds_the_template_prompt(run: dict[str, Any]) -> None:
    from mlsteps.builtin import load_builtin

    tok = _saved(run["dir"], "chat")
    rows = load_builtin("toy/chat", "test")[:3]
    expected = [_template_ids(tok, r["messages"][:-1]) for r in rows]
    assert not _missing(run["fed"], expected)
    ladder = read_json(run["dir"] / "metrics.json")["ev_chat"]["chat"]
    assert ladder["bleu"] >= 0 and ladder["response_perplexity"] > 1


def test_zero_and_few_shot_prompts_are_chat_turns(run: dict[str, Any]) -> None:
    from mlsteps.builtin import load_builtin

    run_dir = run["dir"]
    rows = load_builtin("toy/translate", "test")[:3]
    zero = _saved(run_dir, "zero")
    assert zero.chat_template == _saved(run_dir, "chat").chat_template
    zero_turns = [[{"role": "user", "content": f"Translate into Toy: {r['source']}"}] for r in rows]
    prompt = json.loads((run_dir / "few" / "final" / "mlsteps_prompt.json").read_text())
    assert prompt["chat"] is True and len(prompt["demos"]) == 2
    demo_turns = []
    for demo in prompt["demos"]:  # each demonstration: a user turn and the assistant's reply
        demo_turns += [
            {"role": "user", "content": demo["prompt"]},
            {"role": "assistant", "content": demo["answer"]},
        ]
    few_turns = [demo_turns + turns for turns in zero_turns]
    expected = [_template_ids(zero, t) for t in zero_turns]
    expected += [_template_ids(zero, t) for t in few_turns] * 2  # eval and predict
    assert not _missing(run["fed"], expected)
    # The preview shows the same text.
    preview = json.loads((run_dir / "few" / "prompts_preview.jsonl").read_text().splitlines()[0])
    assert preview["prompt"].startswith("<|im_start|>user\nTranslate into Toy: ")
    assert preview["prompt"].endswith("<|im_start|>assistant\n")
    # predict writes the reply (the turn ends at <|im_end|>, which is not in the text).
    preds = [
        json.loads(x) for x in (run_dir / "pred" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["reference"] for p in preds] == [r["target"] for r in rows]
    assert all("<|im_end|>" not in p["prediction"] for p in preds)


def test_chat_false_keeps_plain_prompts(run: dict[str, Any]) -> None:
    from mlsteps.builtin import load_builtin

    tok = _saved(run["dir"], "plain")
    rows = load_builtin("toy/translate", "test")[:3]
    expected = [tok(f"Translate into Toy: {r['source']}")["input_ids"] for r in rows]
    assert all(ids[0] == tok.convert_tokens_to_ids("<s>") for ids in expected)
    assert not _missing(run["fed"], expected)
    assert (
        json.loads((run["dir"] / "plain" / "final" / "mlsteps_prompt.json").read_text())["chat"]
        is False
    )


def test_rank_classification_scores_the_template_prompt(run: dict[str, Any]) -> None:
    """Likelihood scoring (verbalizers, calibration) encodes a chat prompt as generation does."""
    from mlsteps.engine.generation import encode_prompts
    from mlsteps.engine.inference import load_for_inference
    from mlsteps.prompt.scoring import encode_prompt

    loaded = load_for_inference(str(run["dir"] / "few" / "final"))
    prompter = loaded.prompter
    row = {"source": "A dog sees the cat.", "target": "x"}
    text = prompter.render(row)
    demos = [(d.prompt, d.answer) for d in prompter.demos]
    turns = [m for p, a in demos for m in (
        {"role": "user", "content": p}, {"role": "assistant", "content": a})]  # fmt: skip
    turns.append({"role": "user", "content": "Translate into Toy: A dog sees the cat."})
    expected = _template_ids(loaded.tokenizer, turns)
    assert encode_prompt(loaded.tokenizer, text) == expected
    assert encode_prompts(loaded.tokenizer, [text], decoder_only=True) == [expected]
    assert prompter.answer_prefix == ""
    # The domain-PMI premise is a chat prompt too.
    assert prompter.domain_premise().endswith("<|im_start|>assistant\n")


def test_chat_true_without_a_template_is_a_user_error(tmp_path: Path, run: dict[str, Any]) -> None:
    recipe = tmp_path / "r.yaml"
    model = run["dir"] / "chat" / "final"
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    recipe.write_text(
        "name: x\nstages:\n  p:\n    kind: prompt\n    method: zero_shot\n"
        f"    from: {bare}\n    chat: true\n    template: '{{source}}'\n",
        encoding="utf-8",
    )
    res = cli("run", recipe, "--run-dir", tmp_path / "run")
    assert res.code == 2
    assert "stages.p.chat:" in res.err and "its tokenizer has no chat template" in res.err
    assert not (tmp_path / "run" / "p" / "final").exists()


def test_chat_field_is_refused_for_soft_prompts() -> None:
    stage = {"kind": "prompt", "method": "prompt_tuning", "from": "gpt2", "chat": True,
             "data": "builtin:toy/translate"}  # fmt: skip
    with pytest.raises(UserError) as err:
        validate_recipe({"name": "x", "stages": {"p": stage}})
    assert "'chat' does nothing" in str(err.value)

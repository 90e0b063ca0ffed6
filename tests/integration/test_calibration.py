"""Verbalizer calibration (prompt spec `calibration`) against a brute-force computation.

A tiny random gpt2 (2 layers, width 32) on a byte-level BPE trained here: its verbalizer scores
are biased towards one word for no reason in the input, which is exactly what calibration is
for. The brute force scores every word with one plain forward pass per (context, word), without
any of mlsteps' batching/padding, and applies the formulas of Zhao et al. 2021 (contextual) and
Holtzman et al. 2021 (domain-conditional PMI) by hand.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mlsteps.prompt.calibration import classify_prompted
from mlsteps.prompt.prompter import CONTENT_FREE_INPUTS, Demonstration, Prompter
from mlsteps.prompt.scoring import rank_classify
from mlsteps.recipe.specs.prompt import PromptSpec

WORDS = ["good", "bad", "movie", "plot", "dull", "great", "film", "acting", "the", "was"]
VERBALIZER = {"1": "great", "0": "dull"}
TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=8)) + "\nSentiment: great dull" for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos, pad_token=eos
    )
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    return model, tokenizer


def _brute_logprob(model: Any, tokenizer: Any, context: str, answer: str) -> float:
    """log p(answer | context): one unpadded forward pass, float64 sum over the answer tokens."""
    ctx_ids = tokenizer(context)["input_ids"] or [tokenizer.eos_token_id]
    ans_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx_ids + ans_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(ans_ids))


def _prompter(calibration: str, demos: list[Demonstration] | None = None) -> Prompter:
    return Prompter(
        method="few_shot" if demos else "zero_shot",
        template=TEMPLATE,
        task="classification",
        verbalizer=VERBALIZER,
        demos=demos or [],
        shots=len(demos or []),
        calibration=calibration,
    )


def _rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(1)
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 7)))} for _ in range(n)]


def _brute_decisions(model: Any, tokenizer: Any, prompter: Prompter, rows: list[Any]) -> list[str]:
    labels = list(VERBALIZER)
    words = [" " + VERBALIZER[label] for label in labels]

    def scores(context: str) -> list[float]:
        return [_brute_logprob(model, tokenizer, context, w) for w in words]

    if prompter.calibration == "contextual":
        dists = []
        for text in CONTENT_FREE_INPUTS:
            raw = scores(prompter.render({"text": text}))
            z = sum(math.exp(s) for s in raw)
            dists.append([math.exp(s) / z for s in raw])
        # p_cf: the mean of the renormalised label distributions; decide by p(y|x) / p_cf(y).
        p_cf = [sum(d[j] for d in dists) / len(dists) for j in range(len(labels))]
        ref = [math.log(p) for p in p_cf]
    elif prompter.calibration == "domain_pmi":
        ref = scores("\nSentiment:")  # the template's text after its last field
    else:
        ref = [0.0] * len(labels)
    out = []
    for row in rows:
        raw = scores(prompter.render(row))
        cal = [s - r for s, r in zip(raw, ref, strict=True)]
        out.append(labels[max(range(len(labels)), key=cal.__getitem__)])
    return out


@pytest.mark.parametrize("demos", [False, True], ids=["zero_shot", "few_shot"])
@pytest.mark.parametrize("calibration", ["contextual", "domain_pmi"])
def test_calibration_matches_brute_force_and_changes_decisions(
    tiny: tuple[Any, Any], calibration: str, demos: bool
) -> None:
    model, tokenizer = tiny
    shown = [Demonstration("good film", "great"), Demonstration("dull plot", "dull")]
    rows = _rows(40)
    prompter = _prompter(calibration, shown if demos else None)
    raw_prompter = _prompter("none", shown if demos else None)
    prompts = [prompter.render(r) for r in rows]
    got = classify_prompted(model, tokenizer, prompter, prompts, batch_size=7)
    expected = _brute_decisions(model, tokenizer, prompter, rows)
    assert got == expected
    raw = classify_prompted(model, tokenizer, raw_prompter, prompts, batch_size=7)
    assert raw == _brute_decisions(model, tokenizer, raw_prompter, rows)
    assert raw == rank_classify(model, tokenizer, prompts, VERBALIZER, answer_prefix=" ")
    # The random model leans towards one word regardless of the input; calibration, applied as
    # the formula says (checked above), must actually flip some of its decisions.
    flipped = sum(g != r for g, r in zip(got, raw, strict=True))
    assert 0 < flipped < len(rows)


def test_calibration_spec_defaults_and_validation() -> None:
    def spec(**fields: Any) -> PromptSpec:
        base = {"kind": "prompt", "from": "m", "task": "classification", "verbalizer": VERBALIZER}
        return PromptSpec.model_validate({**base, **fields})

    assert spec(method="zero_shot").resolved_calibration == "contextual"
    assert spec(method="few_shot", data="x.jsonl").resolved_calibration == "contextual"
    assert spec(method="prompt_tuning", data="x.jsonl").resolved_calibration == "none"
    assert spec(method="zero_shot", calibration="domain_pmi").resolved_calibration == "domain_pmi"
    with pytest.raises(ValueError, match="only applies to task: classification"):
        PromptSpec.model_validate(
            {"kind": "prompt", "from": "m", "method": "zero_shot", "calibration": "contextual"}
        )


def test_prompted_model_keeps_its_calibration(tmp_path: Path) -> None:
    prompter = _prompter("domain_pmi")
    data = prompter.to_json(tmp_path)
    assert Prompter.from_json(data).calibration == "domain_pmi"
    legacy = {k: v for k, v in data.items() if k != "calibration"}  # written before the field
    assert Prompter.from_json(legacy).calibration == "none"


def test_soft_prompt_scoring_fits_prompts_at_the_position_limit(tiny: tuple[Any, Any]) -> None:
    """A prompt as long as the model's positions, scored through a soft prompt: the virtual
    tokens take positions too, so the prompt must lose that many more tokens from its start
    (this raised IndexError in the position embedding, in eval of a prompt_tuning model)."""
    import copy

    from mlsteps.prompt.soft_prompt import wrap

    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = wrap(
        copy.deepcopy(model), tokenizer, method="prompt_tuning", num_virtual_tokens=4,
        init_text=None, gradient_checkpointing=False,
    )  # fmt: skip
    long_prompt = " ".join(WORDS * 40)  # far beyond the 128 positions
    assert len(tokenizer(long_prompt)["input_ids"]) > 128
    got = classify_prompted(peft_model, tokenizer, _prompter("none"), [long_prompt, "good film"])
    assert len(got) == 2 and set(got) <= set(VERBALIZER)


def _forward_calls(model: Any) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("soft", [False, True], ids=["plain", "prompt_tuning"])
def test_one_token_labels_take_one_pass_and_score_as_the_pairs(
    tiny: tuple[Any, Any], soft: bool
) -> None:
    """Label words of one token each are scored with one forward pass per prompt, at the
    prompt's last position; the numbers equal the (prompt, word) pair path's to float32 rounding,
    for prompts of mixed lengths, one cut at the position limit, and a soft prompt's virtual
    tokens in front."""
    import copy

    from mlsteps.prompt.scoring import continuation_logprobs, label_logprobs
    from mlsteps.prompt.soft_prompt import wrap

    model, tokenizer = tiny
    if soft:
        torch.manual_seed(0)
        model = wrap(
            copy.deepcopy(model), tokenizer, method="prompt_tuning", num_virtual_tokens=4,
            init_text=None, gradient_checkpointing=False,
        )  # fmt: skip
    words = [" " + w for w in VERBALIZER.values()]
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    prompter = _prompter("none", [Demonstration("good film", "great")])
    prompts = [prompter.render(r) for r in _rows(9)] + [" ".join(WORDS * 40)]
    calls, handle = _forward_calls(model)
    try:
        got = label_logprobs(model, tokenizer, prompts, VERBALIZER, answer_prefix=" ", batch_size=4)
    finally:
        handle.remove()
    assert len(calls) == 3  # 10 prompts in batches of 4; the pair path would take 5 passes
    pairs = continuation_logprobs(
        model, tokenizer, [p for p in prompts for _ in words], words * len(prompts), batch_size=4
    )
    flat = [x for row in got for x in row]
    assert len(flat) == len(pairs)
    # float32 logits, log-softmax over 320 tokens: agreement to ~1e-6 relative, checked at 1e-4
    # absolute on values of about -6 (different padding widths change the rounding only).
    assert max(abs(a - b) for a, b in zip(flat, pairs, strict=True)) < 1e-4


def test_multi_token_labels_keep_the_pair_path(tiny: tuple[Any, Any]) -> None:
    from mlsteps.prompt.scoring import continuation_logprobs, label_logprobs

    model, tokenizer = tiny
    verbalizer = {"1": "great acting", "0": "dull"}  # the first word is two tokens
    prompts = [_prompter("none").render(r) for r in _rows(5)]
    got = label_logprobs(model, tokenizer, prompts, verbalizer, answer_prefix=" ")
    pairs = continuation_logprobs(
        model, tokenizer, [p for p in prompts for _ in verbalizer],
        [" great acting", " dull"] * len(prompts),
    )  # fmt: skip
    assert [x for row in got for x in row] == pairs


@pytest.mark.parametrize("answer_prefix", ["\n", " - "], ids=["one_shared", "two_shared"])
def test_answers_with_shared_tokens_take_one_pass(
    tiny: tuple[Any, Any], answer_prefix: str
) -> None:
    """Answers that are the same tokens and then one token each (a prefix the BPE keeps apart,
    as " 好" / " 差" in a Chinese byte-level BPE) are scored in one pass per prompt too, shared
    tokens included in each answer's log-probability, equal to the pair path's."""
    from mlsteps.prompt.scoring import continuation_logprobs, label_logprobs

    model, tokenizer = tiny
    words = [answer_prefix + w for w in VERBALIZER.values()]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert len(ids[0]) > 1 and ids[0][:-1] == ids[1][:-1]  # really shared tokens
    prompts = [_prompter("none").render(r) for r in _rows(9)] + [" ".join(WORDS * 40)]
    calls, handle = _forward_calls(model)
    try:
        got = label_logprobs(model, tokenizer, prompts, VERBALIZER, answer_prefix=answer_prefix,
                             batch_size=4)  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 3
    pairs = continuation_logprobs(
        model, tokenizer, [p for p in prompts for _ in words], words * len(prompts), batch_size=4
    )
    flat = [x for row in got for x in row]
    assert max(abs(a - b) for a, b in zip(flat, pairs, strict=True)) < 1e-4
    normalized = label_logprobs(model, tokenizer, prompts, VERBALIZER, answer_prefix=answer_prefix,
                                length_normalize=True)  # fmt: skip
    per_token = continuation_logprobs(
        model, tokenizer, [p for p in prompts for _ in words], words * len(prompts),
        length_normalize=True,
    )  # fmt: skip
    flat = [x for row in normalized for x in row]
    assert max(abs(a - b) for a, b in zip(flat, per_token, strict=True)) < 1e-4

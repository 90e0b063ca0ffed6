"""Conditional (response) perplexity against brute-force references on tiny models (no downloads).

Every reference number here is computed the slow, obvious way: one forward pass per example
(per reference), summing the log-probabilities of the reference tokens after the prompt, with
the prompt text written out by hand from the template; or, for seq2seq, the mean loss of
``model(input_ids=source, labels=reference)`` times its token count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from mlsteps.builtin import load_builtin
from mlsteps.context import StageContext
from mlsteps.engine.inference import load_for_inference
from mlsteps.errors import UserError
from mlsteps.metrics.response_perplexity import response_perplexity
from mlsteps.prompt.prompter import PROMPT_FILE, Demonstration, Prompter, save_prompter
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.evaluate import EvalSpec
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.stages import eval as eval_stage
from mlsteps.stages.finetune import sft as fs
from mlsteps.stages.finetune.evaluation import prompter_json

TEMPLATE = "English: {source}\nToy:"  # + answer separator " ": the quickstart's prompt
EOS = "<|endoftext|>"
N_ROWS = 10
VIRTUAL = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on the shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return load_builtin("toy/translate", "test")[:N_ROWS]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]]) -> Path:
    """base (plain gpt2), sft (base + the SFT template), few_shot, soft (prompt tuning),
    seq2seq (t5), and the data file; all share one byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp("condppl")
    train = load_builtin("toy/translate", "train")[:300]
    corpus = [r["source"] for r in train] + [r["target"] for r in train]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=[EOS, "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=512,
            bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    base = out / "base"
    gpt2.save_pretrained(base)
    tok.save_pretrained(base)
    # An SFT model: the base weights + the prompt file the finetune stage writes.
    shutil.copytree(base, out / "sft")
    save_prompter(Prompter(method="finetune", template=TEMPLATE, answer_separator=" "), out / "sft")
    # Few-shot: no weights of its own, two fixed demonstrations.
    demos = [Demonstration(TEMPLATE.format(source=r["source"]), r["target"]) for r in train[:2]]
    (out / "few_shot").mkdir()
    tok.save_pretrained(out / "few_shot")
    save_prompter(
        Prompter(method="few_shot", template=TEMPLATE, demos=demos, shots=2, base_model=str(base)),
        out / "few_shot",
    )
    # Prompt tuning: a peft soft prompt (random, not the vocabulary init) on the base.
    soft = get_peft_model(
        GPT2LMHeadModel.from_pretrained(base),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL),
    )
    with torch.no_grad():
        soft.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    soft.save_pretrained(out / "soft")
    tok.save_pretrained(out / "soft")
    save_prompter(
        Prompter(
            method="prompt_tuning", template=TEMPLATE, base_model=str(base), has_adapter=True,
            num_virtual_tokens=VIRTUAL,
        ),
        out / "soft",
    )  # fmt: skip
    t5 = T5ForConditionalGeneration(
        T5Config(  # type: ignore[call-arg]
            vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
            pad_token_id=1, eos_token_id=0, decoder_start_token_id=1,
        )
    )  # fmt: skip
    t5.save_pretrained(out / "seq2seq")
    tok.save_pretrained(out / "seq2seq")
    data = [dict(r) for r in rows]
    data[3]["target"] = [data[3]["target"], data[4]["target"]]  # several references
    data[5]["target"] = [data[5]["target"], data[6]["target"], data[7]["target"]]
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return out


def _refs(root: Path) -> list[list[str]]:
    lines = (root / "test.jsonl").read_text().splitlines()
    targets = [json.loads(line)["target"] for line in lines]
    return [t if isinstance(t, list) else [t] for t in targets]


def _sources(root: Path) -> list[str]:
    return [json.loads(line)["source"] for line in (root / "test.jsonl").read_text().splitlines()]


def _brute_causal(
    model: Any, tok: Any, prompts: list[str], refs: list[list[str]], soft=None, prefix=" "
) -> tuple[float, float]:
    """(Σ per-row mean NLL, Σ per-row mean token count): one forward pass per reference."""
    nll_total, tokens_total = 0.0, 0.0
    for prompt, row_refs in zip(prompts, refs, strict=True):
        row_nll, row_tokens = 0.0, 0
        for ref in row_refs:
            p = tok(prompt)["input_ids"]
            a = tok(prefix + ref)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + a])
            with torch.no_grad():
                if soft is None:
                    logits = model(input_ids=ids).logits[0]
                else:  # the soft prompt's embeddings in front of the word embeddings, by hand
                    words = model.get_input_embeddings()(ids)
                    embeds = torch.cat([soft.unsqueeze(0), words], dim=1)
                    logits = model(inputs_embeds=embeds).logits[0, soft.shape[0] :]
            logp = torch.log_softmax(logits.double(), -1)
            row_nll -= sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a))
            row_tokens += len(a)
        nll_total += row_nll / len(row_refs)
        tokens_total += row_tokens / len(row_refs)
    return nll_total, tokens_total


def _ctx(tmp_path: Path, root: Path) -> StageContext:
    names = ("base", "sft", "few_shot", "soft", "seq2seq")
    return StageContext(
        run_dir=tmp_path, stage="eval", kind="eval", seed=0, quiet=True,
        upstream={n: root / n for n in names},
    )  # fmt: skip


def _spec(root: Path, models: list[str], **kw: Any) -> EvalSpec:
    return EvalSpec(
        kind="eval",
        models=models,
        data=DataSpec(files=[str(root / "test.jsonl")]),
        metrics=kw.pop("metrics", ["response_perplexity"]),
        **kw,
    )


def test_eval_ladder_matches_brute_force_for_every_model_kind(tmp_path: Path, root: Path) -> None:
    models = ["base", "sft", "few_shot", "soft", "seq2seq"]
    ladder = eval_stage.run(
        _spec(root, models, perplexity={"batch_size": 3}), _ctx(tmp_path, root)
    ).metrics
    sources, refs = _sources(root), _refs(root)
    base = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(root / "base")
    hand = [TEMPLATE.format(source=s) for s in sources]
    demos = "".join(f"{d.prompt} {d.answer}\n\n" for d in _prompter(root / "few_shot").demos)
    soft = load_for_inference(str(root / "soft")).model.get_prompt_embedding_to_save("default")
    expected = {
        # No template: the input column as is, the reference appended without a separator.
        "base": _brute_causal(base, tok, sources, refs, prefix=""),
        "sft": _brute_causal(base, tok, hand, refs),
        "few_shot": _brute_causal(base, tok, [demos + h for h in hand], refs),
        "soft": _brute_causal(base, tok, hand, refs, soft=soft.detach()),
        "seq2seq": _brute_seq2seq(root, sources, refs),
    }
    for label, (nll, tokens) in expected.items():
        row = ladder[label]
        assert row["response_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert row["response_perplexity_tokens"] == pytest.approx(tokens)
        nbytes = sum(sum(len(r.encode()) for r in rr) / len(rr) for rr in refs)
        assert row["response_bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
        assert "mean over a row's references" in row["response_perplexity_convention"]
    notes = {k: v["response_perplexity_convention"] for k, v in ladder.items()}
    assert "input column 'source' as is" in notes["base"]
    assert "SFT template" in notes["sft"] and "2 demonstrations" in notes["few_shot"]
    assert f"{VIRTUAL} soft-prompt virtual tokens" in notes["soft"]
    assert (
        notes["seq2seq"].startswith("response perplexity") and "decoder labels" in notes["seq2seq"]
    )
    assert "EOS (scored" in notes["sft"]
    # The prompt is context, not scored: a different prompt gives a different number.
    assert len({round(ladder[m]["response_perplexity"], 6) for m in models}) == len(models)


def _prompter(path: Path) -> Prompter:
    return Prompter.from_json(json.loads((path / PROMPT_FILE).read_text()))


def _brute_seq2seq(root: Path, sources: list[str], refs: list[list[str]]) -> tuple[float, float]:
    model = T5ForConditionalGeneration.from_pretrained(root / "seq2seq").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(root / "seq2seq")
    nll_total, tokens_total = 0.0, 0.0
    for source, row_refs in zip(sources, refs, strict=True):
        row_nll, row_tokens = 0.0, 0
        for ref in row_refs:
            labels = tok(ref)["input_ids"] + [tok.eos_token_id]  # the tokenizer adds no EOS
            with torch.no_grad():
                loss = model(
                    input_ids=torch.tensor([tok(source)["input_ids"]]),
                    labels=torch.tensor([labels]),
                ).loss
            row_nll += float(loss) * len(labels)
            row_tokens += len(labels)
        nll_total += row_nll / len(row_refs)
        tokens_total += row_tokens / len(row_refs)
    return nll_total, tokens_total


@pytest.mark.parametrize("model", ["sft", "soft", "seq2seq"])
def test_batch_size_does_not_change_the_result(root: Path, model: str) -> None:
    loaded = load_for_inference(str(root / model))
    prompter = loaded.prompter
    prompts = [prompter.render({"source": s}) if prompter else s for s in _sources(root)]
    prefix = prompter.answer_prefix if prompter else ""
    results = [
        response_perplexity(
            loaded.model, loaded.tokenizer, prompts, _refs(root), answer_prefix=prefix,
            batch_size=batch,
        )
        for batch in (1, 4, 32)
    ]  # fmt: skip
    for other in results[1:]:
        assert other.perplexity == pytest.approx(results[0].perplexity, rel=1e-6)
        assert other.scored_tokens == results[0].scored_tokens


def test_sft_scores_exactly_what_training_scored(tmp_path: Path, root: Path) -> None:
    """The finetune stage's own tokenisation and prompt file: response perplexity on the
    training rows is exp(the token-weighted SFT loss) of those rows."""
    spec = FinetuneSpec.model_validate(
        {
            "kind": "finetune", "task": "causal_lm", "from": "base",
            "data": {"files": [str(root / "test.jsonl")]},
            "template": TEMPLATE + " ", "response_column": "target", "max_seq_len": 128,
        }
    )  # fmt: skip
    rows = [r for r in map(json.loads, (root / "test.jsonl").read_text().splitlines())]
    rows = [r for r in rows if isinstance(r["target"], str)]  # one reference: what SFT trains on
    ds = datasets.Dataset.from_list(rows)
    tok = PreTrainedTokenizerFast.from_pretrained(root / "base")
    encoded = fs.tokenize_sft(ds, tok, spec)
    model = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(encoded["input_ids"], encoded["labels"], strict=True):
            n = sum(label != -100 for label in labels)
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            nll, count = nll + float(loss) * n, count + n
    # The prompt file exactly as the finetune stage writes it into final/.
    ctx = StageContext(run_dir=tmp_path, stage="ft", kind="finetune", seed=0, quiet=True)
    sft = tmp_path / "sft_from_stage"
    shutil.copytree(root / "base", sft)
    for name, text in prompter_json(spec, ctx, ds, None).items():
        (sft / name).write_text(text)
    loaded = load_for_inference(str(sft))
    prompts = [loaded.prompter.render(r) for r in rows]
    got = response_perplexity(
        loaded.model, loaded.tokenizer, prompts, [[r["target"]] for r in rows],
        answer_prefix=loaded.prompter.answer_prefix,
    )  # fmt: skip
    assert got.scored_tokens == count
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_a_prompt_that_does_not_fit_loses_its_start(root: Path) -> None:
    loaded = load_for_inference(str(root / "few_shot"))
    tok = loaded.tokenizer
    prompts = [loaded.prompter.render({"source": s}) for s in _sources(root)]
    refs = _refs(root)
    window = 40
    got = response_perplexity(
        loaded.model, tok, prompts, refs, answer_prefix=" ", window_tokens=window
    )
    assert any(len(tok(p)["input_ids"]) > window for p in prompts)  # the case under test
    nll_total, tokens_total = 0.0, 0.0
    for prompt, row_refs in zip(prompts, refs, strict=True):
        row = [0.0, 0]
        for ref in row_refs:
            a = tok(" " + ref)["input_ids"] + [tok.eos_token_id]
            p = tok(prompt)["input_ids"][-(window + 1 - len(a)) :]
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([p + a])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            row[0] -= sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a))
            row[1] += len(a)
        nll_total += row[0] / len(row_refs)
        tokens_total += row[1] / len(row_refs)
    assert got.perplexity == pytest.approx(math.exp(nll_total / tokens_total), rel=1e-5)


def test_missing_columns_and_unfit_models_fail_before_any_model_loads(
    tmp_path: Path, root: Path
) -> None:
    ctx = _ctx(tmp_path, root)
    with pytest.raises(UserError, match="column 'answer' not found") as err:
        eval_stage.run(_spec(root, ["sft"], reference_column="answer"), ctx)
    assert err.value.where == "stages.eval.data"
    with pytest.raises(UserError, match="column 'question' not found") as err:  # no template
        eval_stage.run(_spec(root, ["base"], input_column="question"), ctx)
    assert err.value.where == "stages.eval.data"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"english": "a b", "target": "c"}) + "\n")
    spec = _spec(root, ["sft"]).model_copy(update={"data": DataSpec(files=[str(other)])})
    with pytest.raises(UserError, match="template field 'source' is not a column") as err:
        eval_stage.run(spec, ctx)  # the SFT template reads 'source'
    assert err.value.where == "stages.eval.data"
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def _sharded(root: Path) -> dict[str, list[float]]:
    from mlsteps.metrics.response_perplexity import sharded_response_perplexity

    out = {}
    for name in ("sft", "seq2seq"):
        loaded = load_for_inference(str(root / name))
        render = loaded.prompter.render if loaded.prompter else (lambda r: r["source"])
        prompts = [render({"source": s}) for s in _sources(root)]
        prefix = loaded.prompter.answer_prefix if loaded.prompter else ""
        res = sharded_response_perplexity(
            loaded.model, loaded.tokenizer, prompts, _refs(root), answer_prefix=prefix,
            batch_size=3,
        )  # fmt: skip
        out[name] = [res.perplexity, res.scored_tokens, res.utf8_bytes]
        out[name + "_convention"] = res.convention  # type: ignore[assignment]
    return out


def _rank(local: int, port: int, root: str) -> None:
    os.environ.update(
        RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    result = _sharded(Path(root))
    if local == 0:
        (Path(root) / "two_ranks.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_two_ranks_add_up_to_the_single_process_result(root: Path) -> None:
    import torch.multiprocessing as mp

    one = _sharded(root)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    context = mp.spawn(_rank, args=(port, str(root)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail("ranks still running after 300 s (a hang)")
    two = json.loads((root / "two_ranks.json").read_text())
    for name in ("sft", "seq2seq"):
        assert two[name][0] == pytest.approx(one[name][0], rel=1e-6)
        # Tokens (fractional: a row's mean over its references) and bytes: nothing scored twice.
        assert two[name][1:] == pytest.approx(one[name][1:], rel=1e-12)
        assert two[name + "_convention"] == one[name + "_convention"]

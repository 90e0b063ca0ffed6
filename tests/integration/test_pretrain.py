"""The pretrain stage end to end on tiny models (CLM: gpt2, llama; MLM: bert, roberta), packing,
masking, token-weighted perplexity, and the bad inputs it must reject before writing final/."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from mlsteps.context import StageContext
from mlsteps.engine.modeling import build_model, max_positions
from mlsteps.errors import UserError
from mlsteps.recipe.specs.model import ArchSpec
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import pretrain, tokenizer
from mlsteps.stages.pretrain import lm_data

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
WIKI = SHARED / "wikitext-2" / "valid.txt"
LUXUN = SHARED / "luxun" / "野草.txt"
CHECKPOINT_FILES = {
    "COMPLETE", "config.json", "generation_config.json", "model.safetensors", "optimizer.pt",
    "rng_state.pth", "scheduler.pt", "tokenizer.json", "tokenizer_config.json",
    "trainer_state.json", "training_args.bin", "mlsteps_state.json",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and deterministic
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    made = {}
    for name, data, target, algorithm, vocab in [
        ("clm", WIKI, "clm", "bpe", 300),
        ("clm_big", WIKI, "clm", "bpe", 420),
        ("wordpiece", WIKI, "mlm", "wordpiece", 300),
        ("roberta", WIKI, "mlm", "bpe", 300),
        ("zh", LUXUN, "clm", "bpe", 400),  # NFC: keeps full-width punctuation (NFKC folds it)
    ]:
        ctx = StageContext(run_dir=root, stage=name, kind="tokenizer", seed=0, quiet=True)
        spec = TokenizerSpec.model_validate(
            {
                "kind": "tokenizer",
                "data": {"files": [str(data)], "max_samples": 300},
                "vocab_size": vocab,
                "target": target,
                "algorithm": algorithm,
                "normalization": "nfc" if name == "zh" else "nfkc",
            }
        )
        tokenizer.run(spec, ctx)
        made[name] = ctx.final_dir
    return made


def make_spec(**overrides: Any) -> PretrainSpec:
    base: dict[str, Any] = {
        "kind": "pretrain",
        "objective": "clm",
        "tokenizer": "clm",
        "model": {"family": "gpt2", "n_layers": 2, "hidden_size": 32, "n_heads": 2, "max_positions": 64},
        "data": {"files": [str(WIKI)], "max_samples": 30},
        "validation_fraction": 0.2,
        "max_seq_len": 32,
        "train": {"batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "log_every_steps": 5,
                  "save_every_steps": 10, "max_steps": 20},
    }  # fmt: skip
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return PretrainSpec.model_validate(base)


def make_ctx(run_dir: Path, toks: dict[str, Path], **extra: Path) -> StageContext:
    return StageContext(
        run_dir=run_dir, stage="pretrain", kind="pretrain", seed=0, quiet=True,
        upstream={**toks, **extra},
    )  # fmt: skip


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def gpt2_run(
    tmp_path_factory: pytest.TempPathFactory, toks: dict[str, Path]
) -> tuple[StageContext, dict]:
    ctx = make_ctx(tmp_path_factory.mktemp("gpt2"), toks)
    result = pretrain.run(make_spec(), ctx)
    return ctx, result.metrics


def test_clm_gpt2_end_to_end(gpt2_run: tuple[StageContext, dict]) -> None:
    ctx, metrics = gpt2_run
    assert metrics["global_step"] == 20
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"] / 2
    assert metrics["initial_val_perplexity"] > 100  # untrained: about the vocabulary size
    assert "token-weighted" in metrics["perplexity_convention"]
    assert metrics["tokens_per_s"] > 0 and metrics["train_blocks"] > 0
    assert 0.05 < metrics["train_vocab_coverage"] <= 1  # 30 wikitext lines, a 300-token vocab
    # The exact set of files the stage leaves.
    final_files = {"config.json", "generation_config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    expected = {"metrics.jsonl"} | {f"final/{f}" for f in final_files}
    expected |= {f"checkpoints/checkpoint-{s}/{f}" for s in (10, 20) for f in CHECKPOINT_FILES}
    assert files_under(ctx.stage_dir) == expected
    # datasets' Arrow caches (text files, tokenised documents) live in the run's cache dir.
    assert any(ctx.cache_dir.rglob("cache-*.arrow"))
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [5, 10, 15, 20]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_logs[0])
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20]
    # final/ loads unchanged with the Auto classes and reproduces the evaluated loss.
    model = AutoModelForCausalLM.from_pretrained(ctx.final_dir).eval()
    tok = AutoTokenizer.from_pretrained(ctx.final_dir)
    assert model.config.vocab_size == len(tok)
    ids = tok("The game was released in Japan", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)


def test_embeddings_of_unseen_tokens_stay_where_they_started(
    gpt2_run: tuple[StageContext, dict], toks: dict[str, Path]
) -> None:
    """freeze_unseen_tokens (default on): rows of token ids absent from the training text are
    bit-identical to the initial model (weight decay is 0); rows of seen ids moved."""
    ctx, metrics = gpt2_run
    spec = make_spec()
    tok = AutoTokenizer.from_pretrained(toks["clm"])
    from transformers import set_seed

    set_seed(0)  # the stage seeds with ctx.seed (0) before building the model
    assert spec.model is not None
    initial = build_model(spec.model, tok, "clm").get_input_embeddings().weight.detach()
    final = AutoModelForCausalLM.from_pretrained(ctx.final_dir).get_input_embeddings().weight
    unchanged = (final.detach() == initial).all(dim=1)
    n_unchanged = int(unchanged.sum())
    assert 0 < n_unchanged < len(unchanged)
    # The trained rows are exactly the ids seen in training plus the special tokens.
    seen = round(metrics["train_vocab_coverage"] * len(unchanged))
    special = set(tok.all_special_ids)
    moved = {i for i, same in enumerate(unchanged.tolist()) if not same}
    assert len(moved) <= seen + len(special) and len(moved) >= seen - len(special)
    off = make_spec(freeze_unseen_tokens=False)
    assert off.freeze_unseen_tokens is False


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainer_counts_the_tokens_a_causal_loss_scores(
    tmp_path: Path, toks: dict[str, Path], family: str
) -> None:
    """transformers 5 finds no loss name for GPT2LMHeadModel; its Trainer then divides the summed
    NLL by every label, position 0 included, so the reported loss of a packed 128-token block
    was 127/128 of the true mean. Naming the loss (modeling._name_causal_loss) fixes the count."""
    from transformers import Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(toks["clm"])
    arch = ArchSpec(family=family, n_layers=1, hidden_size=32, n_heads=2)
    model = build_model(arch, tok, "clm")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    counted = trainer._get_num_items_in_batch([{"input_ids": labels, "labels": labels}], "cpu")
    assert int(counted) == 4  # 3 + 1 predicted positions, not the 6 labels
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    from mlsteps.engine.modeling import load_model

    assert load_model(str(saved), "clm").loss_type == "ForCausalLM"


def test_continued_pretraining(tmp_path: Path, toks: dict[str, Path], gpt2_run: tuple) -> None:
    base_ctx, _ = gpt2_run
    spec = make_spec(
        **{"from": "base", "model": None, "tokenizer": None, "train": {"max_steps": 4}}
    )
    ctx = make_ctx(tmp_path, toks, base=base_ctx.final_dir)
    metrics = pretrain.run(spec, ctx).metrics
    # Continuing from a trained model starts far below an untrained model's perplexity.
    assert metrics["initial_val_perplexity"] < 100
    assert (ctx.final_dir / "model.safetensors").is_file()


def test_vocab_mismatch_and_seq_len_over_positions(
    tmp_path: Path, toks: dict[str, Path], gpt2_run: tuple
) -> None:
    base_ctx, _ = gpt2_run
    ctx = make_ctx(tmp_path, toks, base=base_ctx.final_dir)
    bigger = make_spec(**{"from": "base", "model": None, "tokenizer": "clm_big"})
    with pytest.raises(UserError, match=r"^stages\.pretrain\.tokenizer: tokenizer has \d+ tokens"):
        pretrain.run(bigger, ctx)
    too_long = make_spec(**{"from": "base", "model": None, "tokenizer": None, "max_seq_len": 100})
    with pytest.raises(
        UserError, match=r"^stages\.pretrain\.max_seq_len: .*exceeds the model's 64"
    ):
        pretrain.run(too_long, ctx)
    assert not ctx.stage_dir.exists()  # rejected before anything was written


def test_llama_on_chinese(tmp_path: Path, toks: dict[str, Path]) -> None:
    spec = make_spec(
        tokenizer="zh",
        model={"family": "llama"},
        data={"files": [str(LUXUN)], "max_samples": 60},
        train={"max_steps": 15},
    )
    ctx = make_ctx(tmp_path, toks)
    metrics = pretrain.run(spec, ctx).metrics
    # 1.8x measured (397 -> 222): 54% of the vocabulary never occurs in these 60 lines, and
    # freeze_unseen_tokens keeps those rows (and so their share of the held-out text) untrained.
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"] / 1.5
    tok = AutoTokenizer.from_pretrained(ctx.final_dir)
    text = "我家的后园，可以看见墙外有两株树"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert AutoModelForCausalLM.from_pretrained(ctx.final_dir).config.model_type == "llama"


@pytest.mark.parametrize(
    ("family", "tok_name", "whole_word"),
    [("bert", "wordpiece", False), ("roberta", "roberta", True)],
)
def test_mlm_end_to_end(
    tmp_path: Path, toks: dict[str, Path], family: str, tok_name: str, whole_word: bool
) -> None:
    spec = make_spec(
        objective="mlm", tokenizer=tok_name, model={"family": family}, whole_word_mask=whole_word,
        train={"max_steps": 12},
    )  # fmt: skip
    ctx = make_ctx(tmp_path, toks)
    metrics = pretrain.run(spec, ctx).metrics
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"]
    assert metrics["perplexity_convention"].startswith("masked-token perplexity")
    model = AutoModelForMaskedLM.from_pretrained(ctx.final_dir)
    tok = AutoTokenizer.from_pretrained(ctx.final_dir)
    assert model.config.model_type == family
    encoded = tok("the film was good", return_tensors="pt")
    assert (
        encoded["input_ids"][0, 0] == tok.cls_token_id
        and encoded["input_ids"][0, -1] == tok.sep_token_id
    )
    assert max_positions(model) == 64


def test_text_shorter_than_one_block(tmp_path: Path, toks: dict[str, Path]) -> None:
    path = tmp_path / "short.txt"
    path.write_text("A short text .\nAnother one .\n")
    spec = make_spec(data={"files": [str(path)]}, validation_fraction=0)
    with pytest.raises(
        UserError,
        match=r"^stages\.pretrain\.data: the training text has \d+ tokens, fewer than one block",
    ):
        pretrain.run(spec, make_ctx(tmp_path / "run", toks))


def test_several_sources_and_columns_are_one_text(tmp_path: Path, toks: dict[str, Path]) -> None:
    """data: a list of sources; text_column: a list. Each column of each source adds its rows as
    documents, column after column (a sentence never sits next to its own translation)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"en": f"english {i} .", "xx": f"toyish {i} ."}) + "\n" for i in range(40)
        )
    )
    spec = make_spec(
        data=[{"files": [str(WIKI)], "max_samples": 30}, {"files": [str(pairs)]}],
        validation=[{"files": [str(pairs)], "max_samples": 4}],
        text_column=["text", "en", "xx"],
    )
    assert len(spec.data) == 2
    rows, val = pretrain._load_text(spec, make_ctx(tmp_path / "r", toks))
    text = rows["__mlsteps_text__"]
    assert len(text) == 30 + 40 + 40
    assert text[30:32] == ["english 0 .", "english 1 ."] and text[70] == "toyish 0 ."
    assert val is not None and val["__mlsteps_text__"][:5] == [
        "english 0 .",
        "english 1 .",
        "english 2 .",
        "english 3 .",
        "toyish 0 .",
    ]
    ctx = make_ctx(tmp_path / "run", toks)
    metrics = pretrain.run(spec, ctx).metrics
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"]
    assert (ctx.final_dir / "model.safetensors").is_file()
    # A source with none of the listed columns is refused.
    bad = make_spec(data=[{"files": [str(WIKI)], "max_samples": 5}, {"files": [str(pairs)]}])
    with pytest.raises(UserError, match=r"^stages\.pretrain\.text_column: column 'text' not found"):
        pretrain.run(bad, make_ctx(tmp_path / "bad", toks))


def test_missing_column_and_wrong_tokenizer(tmp_path: Path, toks: dict[str, Path]) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
    with pytest.raises(
        UserError, match=r"^stages\.pretrain\.text_column: column 'text' not found.*body"
    ):
        pretrain.run(make_spec(data={"files": [str(path)]}), make_ctx(tmp_path / "a", toks))
    mlm_with_clm_tok = make_spec(objective="mlm", model={"family": "bert"})
    with pytest.raises(UserError, match="mask"):
        pretrain.run(mlm_with_clm_tok, make_ctx(tmp_path / "b", toks))


def test_packing_clm_and_mlm() -> None:
    docs = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 10, 11, 9]]}
    )
    blocks = lm_data.pack_blocks(docs, 4, keep_remainder=False)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 9], [4, 5, 9, 6], [7, 8, 10, 11]]
    kept = lm_data.pack_blocks(docs, 5, keep_remainder=True)
    assert [b["input_ids"] for b in kept] == [[1, 2, 3, 9, 4], [5, 9, 6, 7, 8], [10, 11, 9]]
    mlm = lm_data.pack_blocks(docs, 6, keep_remainder=False, wrap=(100, 101))
    assert [b["input_ids"] for b in mlm] == [
        [100, 1, 2, 3, 9, 101],
        [100, 4, 5, 9, 6, 101],
        [100, 7, 8, 10, 11, 101],
    ]
    with pytest.raises(UserError, match="13 tokens, fewer than one block of max_seq_len 14"):
        lm_data.pack_blocks(docs, 14, keep_remainder=False)
    # ids 1..11 occur (9 twice); 100/101 are outside a 12-token vocabulary and not counted
    assert lm_data.seen_token_ids(blocks, 12).tolist() == list(range(1, 12))
    assert lm_data.seen_token_ids(mlm, 12).tolist() == list(range(1, 12))
    assert lm_data.seen_token_ids(blocks, 5).tolist() == [1, 2, 3, 4]


def test_loss_is_token_weighted(toks: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(toks["clm"])
    torch.manual_seed(0)
    model = build_model(
        ArchSpec(family="gpt2", n_layers=1, hidden_size=32, n_heads=2), tok, "clm"
    ).eval()
    collate = lm_data.CausalCollator(tok.pad_token_id)
    blocks = [{"input_ids": list(range(3, 3 + n))} for n in (20, 20, 3)]  # 19 + 19 + 2 scored
    batches = [collate(blocks[:2]), collate(blocks[2:])]
    with torch.no_grad():
        result = lm_data.LossEvaluator(batches, causal=True)(model)
        per_block = []
        for block in blocks:
            ids = torch.tensor([block["input_ids"]])
            logits = model(ids).logits[0, :-1]
            per_block.append(
                torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            )
        all_nll = torch.cat(per_block)
        batch_means = [torch.cat(per_block[:2]).mean(), per_block[2].mean()]
    assert result["val_scored_tokens"] == 40
    assert result["val_loss"] == pytest.approx(float(all_nll.mean()), rel=1e-5)
    assert result["val_loss"] != pytest.approx(float(sum(batch_means) / 2), rel=1e-4)


def test_masking_collator(toks: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(toks["wordpiece"])
    collator = lm_data.MaskingCollator(tok, probability=0.15, whole_word=False, seed=3)
    body = list(range(len(tok.all_special_ids) + 5, len(tok.all_special_ids) + 205))
    features = [{"input_ids": [tok.cls_token_id, *body, tok.sep_token_id]}] * 64
    features.append({"input_ids": [tok.cls_token_id, body[0], tok.sep_token_id]})
    first = collator(features)
    labels, inputs = first["labels"], first["input_ids"]
    masked = labels != -100
    ids = torch.tensor(
        [f["input_ids"] + [tok.pad_token_id] * (202 - len(f["input_ids"])) for f in features]
    )
    assert not masked[:, 0].any() and not masked[:, 201].any() and not masked[-1, 2:].any()
    assert masked[-1, 1]  # a short sequence still gets one masked token
    share = masked[:-1].float().mean().item() * 202 / 200
    assert 0.13 < share < 0.17
    replaced = (inputs[masked] == tok.mask_token_id).float().mean().item()
    unchanged = (inputs[masked] == ids[masked]).float().mean().item()
    assert 0.77 < replaced < 0.83 and 0.07 < unchanged < 0.13
    # Masks depend on (seed, batch_serial) only.
    assert collator.batch_serial == 1
    second = collator(features)
    assert not torch.equal(second["labels"], labels)
    collator.batch_serial = 0
    assert torch.equal(collator(features)["labels"], labels)


def test_whole_word_masking_masks_words_together(toks: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(toks["wordpiece"])
    text = " ".join(["unbelievably incomprehensible telecommunications"] * 20)
    ids = tok(text)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert any(t.startswith("##") for t in tokens)
    collator = lm_data.MaskingCollator(tok, probability=0.3, whole_word=True, seed=0)
    labels = collator([{"input_ids": ids}] * 8)["labels"]
    for row in labels:
        masked = (row != -100).tolist()
        for i in range(1, len(tokens)):
            if tokens[i].startswith("##"):
                assert masked[i] == masked[i - 1], (i, tokens[i - 1 : i + 1])
    assert (labels != -100).any()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta", "t5", "bart"])
def test_build_model_takes_vocab_and_ids_from_tokenizer(toks: dict[str, Path], family: str) -> None:
    tok = AutoTokenizer.from_pretrained(
        toks["wordpiece"] if family in ("bert", "roberta") else toks["clm"]
    )
    task = {"gpt2": "clm", "llama": "clm", "bert": "mlm", "roberta": "mlm"}.get(family, "seq2seq")
    arch = ArchSpec(family=family, n_layers=1, hidden_size=32, n_heads=2, max_positions=48)
    model = build_model(arch, tok, task)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert max_positions(model) == (None if family == "t5" else 48)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    with pytest.raises(UserError, match="cannot do"):
        build_model(arch, tok, "mlm" if task != "mlm" else "clm", model_field="model")

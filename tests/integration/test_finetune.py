"""End-to-end tests of the finetune stage on tiny models (2 layers, width 32) built from configs.

Every model and tokenizer is made here from local text: nothing is downloaded. "Pretrained"
bases are tiny random models saved to a directory, which is how a hub checkpoint looks to the
stage. Real data comes from ../shared/data (sst2, tatoeba) and the builtin toy sets.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from mlsteps.context import StageContext
from mlsteps.engine.modeling import build_model
from mlsteps.errors import StageInterrupted, UserError
from mlsteps.prompt.prompter import load_prompter
from mlsteps.recipe.specs.finetune import FinetuneSpec
from mlsteps.recipe.specs.model import ArchSpec
from mlsteps.stages.finetune import data as fd
from mlsteps.stages.finetune import run
from mlsteps.stages.finetune import sft as fs

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SST2 = DATA / "sst2"
TATOEBA = DATA / "tatoeba_cmn_eng" / "cmn.txt"
TINY = {
    "n_layers": 2,
    "hidden_size": 32,
    "n_heads": 2,
    "intermediate_size": 64,
    "max_positions": 128,
}
QUIET_TRAIN = {"log_every_steps": 1, "save_every_steps": 1000, "lr": 3e-3, "warmup_steps": 0}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads make them ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texts() -> list[str]:
    from mlsteps.builtin import load_builtin

    rows = (
        load_builtin("toy/translate", "train")[:1500] + load_builtin("toy/sentiment", "train")[:800]
    )
    texts = [r.get("source", r.get("text", "")) for r in rows] + [r.get("target", "") for r in rows]
    texts += [
        line.split("\t")[0] for line in SST2.joinpath("dev.tsv").read_text().splitlines()[:800]
    ]
    return [t for t in texts if t]


def _train_tokenizers(root: Path) -> tuple[Path, Path]:
    """One byte-level BPE saved twice: with a pad token, and without one (so pad == eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_texts(), trainer)
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", **specials).save_pretrained(
        root / "tok"
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(root / "tok_nopad")
    return root / "tok", root / "tok_nopad"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizers (with pad; without pad, so pad == eos) and tiny 'pretrained' model dirs."""
    root = tmp_path_factory.mktemp("assets")
    with_pad, without_pad = _train_tokenizers(root)
    out = {"tok": with_pad, "tok_nopad": without_pad}
    for family, task, tok_key in [
        ("gpt2", "clm", "tok_nopad"),
        ("bert", "mlm", "tok"),
        ("bart", "seq2seq", "tok"),
    ]:
        tokenizer = AutoTokenizer.from_pretrained(out[tok_key])
        torch.manual_seed(0)
        model: Any = build_model(ArchSpec(family=family, **TINY), tokenizer, task)
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    return out


def _ctx(tmp_path: Path, stop_event: threading.Event | None = None) -> StageContext:
    ctx = StageContext(run_dir=tmp_path, stage="ft", kind="finetune", seed=0, quiet=True)
    if stop_event is not None:
        ctx.stop_event = stop_event
    return ctx


def _spec(**fields: Any) -> FinetuneSpec:
    fields.setdefault("kind", "finetune")
    train = {**QUIET_TRAIN, **fields.pop("train", {})}
    return FinetuneSpec.model_validate({**fields, "train": train})


def _toy(name: str, split: str, n: int) -> dict[str, Any]:
    return {"builtin": name, "split": split, "max_samples": n}


def _logged_losses(ctx: StageContext) -> list[float]:
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    return [r["loss"] for r in records if r.get("loss") is not None]


def _stage_files(ctx: StageContext) -> set[str]:
    return {p.name for p in ctx.stage_dir.iterdir()}


def _final_files(ctx: StageContext) -> set[str]:
    return {p.name for p in ctx.final_dir.iterdir()}


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def _accuracy(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], label2id: dict[str, int]
) -> float:
    model.eval()
    hits = 0
    for row in rows:
        with torch.no_grad():
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits
        hits += int(logits.argmax(-1).item() == label2id[str(row["label"])])
    return hits / len(rows)


# ---------------------------------------------------------------- classification


def test_classification_full_from_scratch_on_sst2(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(
        task="classification",
        model={"family": "bert", **TINY},
        tokenizer=str(assets["tok"]),
        # dev.tsv/test.tsv: real SST-2 rows, cheaper to parse than the 60k-row train.tsv.
        data={"files": [str(SST2 / "dev.tsv")], "max_samples": 480},
        validation={"files": [str(SST2 / "test.tsv")], "max_samples": 64},
        text_column="sentence",
        max_seq_len=64,
        train={"batch_size": 16, "epochs": 1, "eval_every_steps": 15},
    )
    ctx = _ctx(tmp_path)
    result = run(spec, ctx)

    assert _stage_files(ctx) == {"final", "checkpoints", "metrics.jsonl"}
    assert _final_files(ctx) == {"config.json", "model.safetensors"} | TOKENIZER_FILES
    assert result.metrics["global_step"] == 30
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert 0.0 <= result.metrics["val_macro_f1"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(ctx.final_dir)
    assert model.config.id2label == {0: "0", 1: "1"}
    # Reported accuracy is reproducible from final/ alone.
    rows = [
        {"text": s, "label": int(lab)}
        for s, lab in (
            line.split("\t") for line in (SST2 / "test.tsv").read_text().splitlines()[1:65]
        )
    ]
    tokenizer = AutoTokenizer.from_pretrained(ctx.final_dir)
    got = _accuracy(model, tokenizer, rows, {"0": 0, "1": 1})
    assert got == pytest.approx(result.metrics["val_accuracy"])
    evals = [
        r for r in map(json.loads, ctx.metrics_path.read_text().splitlines()) if "val_loss" in r
    ]
    assert [r["step"] for r in evals] == [15, 30]


def _sentiment_lora(assets: dict[str, Path], **extra: Any) -> FinetuneSpec:
    return _spec(
        task="classification",
        **{"from": str(assets["gpt2"])},
        method="lora",
        data=_toy("toy/sentiment", "train", 320),
        validation=_toy("toy/sentiment", "validation", 48),
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"batch_size": 16, "max_steps": 12, "lr": 1e-2},
        **extra,
    )


def test_classification_lora_adapter_string_labels(assets: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    ctx = _ctx(tmp_path)
    result = run(_sentiment_lora(assets, class_weights=True), ctx)

    assert _final_files(ctx) == {
        "adapter_config.json", "adapter_model.safetensors", "mlsteps_adapter.json", "README.md",
    } | TOKENIZER_FILES  # fmt: skip
    adapter_config = json.loads((ctx.final_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(assets["gpt2"])
    info = json.loads((ctx.final_dir / "mlsteps_adapter.json").read_text())
    assert info["label2id"] == {"negative": 0, "positive": 1}
    base = AutoModelForSequenceClassification.from_pretrained(
        adapter_config["base_model_name_or_path"], num_labels=info["num_labels"]
    )
    model = PeftModel.from_pretrained(base, ctx.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(ctx.final_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    from mlsteps.builtin import load_builtin

    rows = load_builtin("toy/sentiment", "validation")[:48]
    assert _accuracy(model, tokenizer, rows, info["label2id"]) == pytest.approx(
        result.metrics["val_accuracy"]
    )
    losses = _logged_losses(ctx)
    assert min(losses[-3:]) < losses[0], losses
    # eval/predict load the adapter with its label names, and score like the model above.
    from mlsteps.engine.inference import load_for_inference

    loaded = load_for_inference(str(ctx.final_dir))
    assert loaded.model.config.id2label == {0: "negative", 1: "positive"}
    one = tokenizer(rows[0]["text"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**one).logits
        assert torch.allclose(loaded.model(**one).logits, expected, atol=1e-5)


def test_classification_lora_merge(assets: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    result = run(_sentiment_lora(assets, merge=True), ctx)

    assert _final_files(ctx) == {"config.json", "model.safetensors"} | TOKENIZER_FILES
    model = AutoModelForSequenceClassification.from_pretrained(ctx.final_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.config.label2id == {"negative": 0, "positive": 1}
    from mlsteps.builtin import load_builtin

    rows = load_builtin("toy/sentiment", "validation")[:48]
    tokenizer = AutoTokenizer.from_pretrained(ctx.final_dir)
    got = _accuracy(model, tokenizer, rows, model.config.label2id)
    assert got == pytest.approx(result.metrics["val_accuracy"])


# ---------------------------------------------------------------- seq2seq


def test_seq2seq_full_from_scratch_t5_learns(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(
        task="seq2seq",
        model={"family": "t5", **TINY},
        tokenizer=str(assets["tok"]),
        data=_toy("toy/translate", "train", 480),
        validation=_toy("toy/translate", "validation", 16),
        source_prefix="translate: ",
        max_source_len=48,
        max_target_len=40,
        validation_max_samples=8,
        generation={"max_new_tokens": 12},
        train={"batch_size": 16, "max_steps": 30},
    )
    ctx = _ctx(tmp_path)
    result = run(spec, ctx)

    assert _stage_files(ctx) == {"final", "checkpoints", "metrics.jsonl", "predictions.jsonl"}
    assert _final_files(ctx) == {
        "config.json", "generation_config.json", "model.safetensors", "mlsteps_prompt.json",
    } | TOKENIZER_FILES  # fmt: skip
    # eval/predict rebuild the training input (source_prefix) from the prompt file.
    prompter = load_prompter(ctx.final_dir)
    assert prompter is not None and prompter.model_kind == "seq2seq"
    assert prompter.render({"source": "Two boys {x}."}) == "translate: Two boys {x}."
    losses = _logged_losses(ctx)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses  # nats per target token
    for key in ("val_loss", "val_bleu", "val_chrf", "val_rougeL"):
        assert isinstance(result.metrics[key], float)
    assert (
        "BLEU" in result.metrics["val_bleu_signature"]
        or "nrefs" in result.metrics["val_bleu_signature"]
    )
    preds = [json.loads(line) for line in ctx.predictions_path.read_text().splitlines()]
    assert len(preds) == 8
    assert preds[0]["input"].startswith("translate: ")
    AutoModelForSeq2SeqLM.from_pretrained(ctx.final_dir)


def test_seq2seq_lora_adapter_on_bart(assets: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    spec = _spec(
        task="seq2seq",
        **{"from": str(assets["bart"])},
        method="lora",
        data=_toy("toy/translate", "train", 64),
        validation=_toy("toy/translate", "validation", 8),
        validation_max_samples=4,
        generation={"max_new_tokens": 6},
        train={"batch_size": 8, "max_steps": 4},
    )
    ctx = _ctx(tmp_path)
    run(spec, ctx)
    assert "adapter_config.json" in _final_files(ctx)
    cfg = json.loads((ctx.final_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["target_modules"]
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    base = AutoModelForSeq2SeqLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, ctx.final_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())


# ---------------------------------------------------------------- causal LM (SFT)


def _sft_spec(assets: dict[str, Path], **extra: Any) -> FinetuneSpec:
    train = extra.pop("train", {})
    fields: dict[str, Any] = {
        "task": "causal_lm",
        "from": str(assets["gpt2"]),
        "data": {"files": [str(TATOEBA)], "format": "tsv", "max_samples": 256},
        "validation_fraction": 0.05,
        # cmn.txt has no header: the first pair names the columns (english "Hi.", chinese "嗨。").
        "template": "English: {Hi.}\nChinese: ",
        "response_column": "嗨。",
        "target_lang": "zh",
        "max_seq_len": 64,
        "validation_max_samples": 4,
        "generation": {"max_new_tokens": 8},
        "train": {"batch_size": 16, "max_steps": 12, "lr": 1e-2, **train},
    }
    return _spec(**{**fields, **extra})


def test_sft_labels_keep_eos_when_pad_is_eos(assets: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets["gpt2"])
    tokenizer.pad_token = tokenizer.eos_token  # what the stage does for gpt2-style tokenizers
    spec = FinetuneSpec.model_validate(
        {"kind": "finetune", "task": "causal_lm", "from": "x", "data": "x.jsonl", "max_seq_len": 32}
    )
    import datasets

    rows = datasets.Dataset.from_list(
        [
            {"prompt": "Q: hi\nA: ", "response": "hello"},
            {"prompt": "Q: a longer question here\nA: ", "response": "ok"},
        ]
    )
    encoded = fs.tokenize_sft(rows, tokenizer, spec)
    batch = fs.SftCollator(pad_token_id=tokenizer.pad_token_id)(list(encoded))
    eos = tokenizer.eos_token_id
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row]
        assert labels[n - 1].item() == eos  # EOS scored even though it equals the pad id
        assert (labels[n:] == fd.IGNORE_INDEX).all()  # padding masked by position
        # The prompt's trailing space moves to the response side ("A:" | " hello"), as BPE
        # pretraining saw it; generation is prompted with the stripped prompt.
        prompt = rows[row]["prompt"].rstrip(" ")
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert (labels[:prompt_len] == fd.IGNORE_INDEX).all()
        assert (labels[prompt_len:n] != fd.IGNORE_INDEX).all()
        response = tokenizer(" " + rows[row]["response"], add_special_tokens=False)["input_ids"]
        assert labels[prompt_len:n].tolist() == response + [eos]
    assert (batch["input_ids"][1][int(batch["attention_mask"][1].sum()) :] == eos).all()


def test_packing_matches_unpacked_loss(assets: dict[str, Path]) -> None:
    """Packed sequences (restarting position_ids, no attention mask) score each example exactly
    as if it were alone: no attention across example boundaries."""
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(assets["gpt2"])
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(assets["gpt2"]).eval()
    model.config.use_cache = False
    spec = FinetuneSpec.model_validate(
        {"kind": "finetune", "task": "causal_lm", "from": "x", "data": "x.jsonl", "max_seq_len": 64}
    )
    rows = datasets.Dataset.from_list(
        [
            {"prompt": f"Q: {w} number {i}\nA: ", "response": f"{w} {i} ok"}
            for i, w in enumerate(["cat", "dog", "red hens", "blue"])
        ]
    )
    encoded = fs.tokenize_sft(rows, tokenizer, spec)
    packed = fs.pack_sft(encoded, 64)
    assert len(packed) < len(encoded)
    collate = fs.SftCollator(pad_token_id=tokenizer.pad_token_id)

    def summed_nll(batch: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        return float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
        )

    alone = sum(summed_nll(collate([ex])) for ex in encoded)
    together = summed_nll(collate(list(packed)))
    assert together == pytest.approx(alone, rel=1e-4)


def test_sft_full_on_tatoeba_with_pad_eq_eos(assets: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    result = run(_sft_spec(assets), ctx)
    assert _stage_files(ctx) == {"final", "checkpoints", "metrics.jsonl", "predictions.jsonl"}
    # The template's column "Hi." is no Python identifier: the prompt file used to be skipped.
    assert _final_files(ctx) == {
        "config.json", "generation_config.json", "model.safetensors", "mlsteps_prompt.json",
    } | TOKENIZER_FILES  # fmt: skip
    prompter = load_prompter(ctx.final_dir)
    assert prompter is not None and prompter.render({"Hi.": "Run."}) == "English: Run.\nChinese:"
    losses = _logged_losses(ctx)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert "tok:zh" in result.metrics["val_bleu_signature"]
    model = AutoModelForCausalLM.from_pretrained(ctx.final_dir)
    assert model.config.use_cache is True
    tokenizer = AutoTokenizer.from_pretrained(ctx.final_dir)
    assert tokenizer.pad_token == tokenizer.eos_token


def test_sft_lora_merge_with_packing(assets: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    spec = _sft_spec(
        assets, method="lora", merge=True, packing=True, lora={"r": 4},
        data=_toy("toy/translate", "train", 160), template="Translate: {source}\nOutput: ",
        response_column="target", target_lang=None,
    )  # fmt: skip
    result = run(spec, ctx)
    assert _final_files(ctx) == {
        "config.json", "generation_config.json", "model.safetensors", "mlsteps_prompt.json",
    } | TOKENIZER_FILES  # fmt: skip
    prompter = load_prompter(ctx.final_dir)
    assert prompter is not None and prompter.model_kind == "causal" and not prompter.has_adapter
    assert prompter.render({"source": "Hi."}) == "Translate: Hi.\nOutput:"
    assert prompter.continuation("Ka.") == " Ka."
    preds = [json.loads(line) for line in ctx.predictions_path.read_text().splitlines()]
    assert preds[0]["input"].startswith("Translate: ")
    state = load_file(str(ctx.final_dir / "model.safetensors"))
    assert not any("lora" in k for k in state)
    base = load_file(str(assets["gpt2"] / "model.safetensors"))
    changed = [k for k in base if "c_attn" in k and not torch.equal(base[k], state[k])]
    assert changed  # the LoRA update was folded into the base weights
    assert result.metrics["trainable_params"] < 20_000


# ---------------------------------------------------------------- resume


class _StopAtStep(threading.Event):
    """The runner's stop event, set by 'SIGINT' right after optimizer step ``step``: the
    training callback polls it once per step."""

    def __init__(self, step: int):
        super().__init__()
        self.polls = 0
        self.step = step

    def is_set(self) -> bool:
        self.polls += 1
        return self.polls >= self.step or super().is_set()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_after_stop_equals_uninterrupted(
    assets: dict[str, Path], tmp_path: Path, method: str
) -> None:
    spec = _sft_spec(
        assets,
        method=method,
        lora={"r": 4, "dropout": 0.1},  # dropout: the resumed RNG stream must match too
        data=_toy("toy/translate", "train", 96),
        template="Translate: {source}\nOutput: ",
        response_column="target",
        target_lang=None,
        validation_max_samples=2,
        generation={"max_new_tokens": 4},
        train={"max_steps": 5, "save_every_steps": 3, "batch_size": 8},
    )
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"

    straight = _ctx(tmp_path / "a")
    expected = run(spec, straight)

    stopped = _ctx(tmp_path / "b", stop_event=_StopAtStep(2))
    with pytest.raises(StageInterrupted):
        run(spec, stopped)
    assert not stopped.final_dir.exists()
    assert (stopped.checkpoints_dir / "checkpoint-2" / "COMPLETE").is_file()
    resumed = run(spec, _ctx(tmp_path / "b"))

    assert resumed.metrics["global_step"] == expected.metrics["global_step"] == 5
    a = load_file(str(straight.final_dir / weights))
    b = load_file(str(stopped.final_dir / weights))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["val_loss"] == pytest.approx(expected.metrics["val_loss"], rel=1e-5)


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, spec: FinetuneSpec, *needles: str) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(UserError) as info:
        run(spec, ctx)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not ctx.stage_dir.exists(), "nothing may be written before the input is checked"


def test_missing_column_names_it_and_lists_existing(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec(
        task="classification",
        **{"from": str(assets["bert"])},
        data={"files": [str(SST2 / "dev.tsv")]},
    )
    _bad(tmp_path, spec, "'text'", "sentence, label", "stages.ft.data")


def test_unseen_validation_label(assets: dict[str, Path], tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a b", "label": "positive"}\n{"text": "c", "label": "neutral"}\n')
    spec = _spec(
        task="classification",
        **{"from": str(assets["bert"])},
        data=_toy("toy/sentiment", "train", 50),
        validation={"files": [str(val)]},
    )
    _bad(tmp_path / "run", spec, "neutral", "never seen", "negative, positive")


def test_empty_validation_split(assets: dict[str, Path], tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text("\n")
    spec = _spec(
        task="classification",
        **{"from": str(assets["bert"])},
        data=_toy("toy/sentiment", "train", 50),
        validation={"files": [str(val)]},
    )
    _bad(tmp_path / "run", spec, "empty", "stages.ft.validation")


def test_seq2seq_on_decoder_only_model(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(
        task="seq2seq", **{"from": str(assets["gpt2"])}, data=_toy("toy/translate", "train", 20)
    )
    _bad(tmp_path, spec, "gpt2", "seq2seq")


def test_classification_head_missing_for_family(tmp_path: Path, assets: dict[str, Path]) -> None:
    from transformers import MarianConfig

    # Only config.json: the task is checked on the config, before any weights are read.
    MarianConfig(vocab_size=600, d_model=32, pad_token_id=0).save_pretrained(tmp_path / "marian")
    spec = _spec(
        task="classification",
        **{"from": str(tmp_path / "marian")},
        tokenizer=str(assets["tok"]),
        data=_toy("toy/sentiment", "train", 20),
    )
    _bad(tmp_path / "run", spec, "marian", "classification")


def test_lora_targets_matching_nothing_list_existing(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec(
        task="causal_lm",
        **{"from": str(assets["gpt2"])},
        method="lora",
        lora={"target_modules": ["q_proj", "c_attn"]},
        data=_toy("toy/translate", "train", 20),
        prompt_column="source",
        response_column="target",
    )
    _bad(tmp_path, spec, "q_proj", "c_attn, c_proj", "lora.target_modules")


def test_template_naming_missing_column(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(
        task="causal_lm",
        **{"from": str(assets["gpt2"])},
        data=_toy("toy/translate", "train", 20),
        template="Translate: {src}\n",
        response_column="target",
    )
    _bad(tmp_path, spec, "'src'", "source, target")


def test_lora_needs_pretrained_base() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        _spec(
            task="causal_lm", model={"family": "gpt2"}, tokenizer="t", method="lora", data="x.txt"
        )


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta", "t5", "bart"])
def test_lora_defaults_match_every_family(assets: dict[str, Path], family: str) -> None:
    """Default targets exist in each family, and the new classification head is trained and
    saved with the adapter (modules_to_save), not adapted."""
    from mlsteps.engine import lora
    from mlsteps.recipe.specs.model import LoraSpec

    tokenizer = AutoTokenizer.from_pretrained(assets["tok"])
    model = build_model(ArchSpec(family=family, **TINY), tokenizer, "classification", num_labels=3)
    heads = lora.head_modules(model)
    assert heads and all(h != model.base_model_prefix for h in heads)
    wrapped = lora.wrap(model, LoraSpec(), "classification")
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any(f"{heads[0]}.modules_to_save" in n for n in trainable)
    frozen = {n for n, p in wrapped.named_parameters() if not p.requires_grad}
    assert any("embed" in n or "wte" in n or "shared" in n for n in frozen)

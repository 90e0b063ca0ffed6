"""The eval and predict stages end to end on tiny models built from configs (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from mlsteps.context import StageContext
from mlsteps.engine.generation import generate
from mlsteps.engine.inference import load_for_inference
from mlsteps.errors import UserError
from mlsteps.metrics import perplexity, text
from mlsteps.recipe.specs.data import DataSpec
from mlsteps.recipe.specs.evaluate import EvalSpec, PredictSpec
from mlsteps.recipe.specs.model import GenerationSpec
from mlsteps.stages import eval as eval_stage
from mlsteps.stages import predict as predict_stage

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on the shared 2 cores
    yield
    torch.set_num_threads(before)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    import gzip

    with gzip.open(DATA / "multi30k" / "val.en.gz", "rt", encoding="utf-8") as f:
        en = [next(f).strip() for _ in range(12)]
    with gzip.open(DATA / "multi30k" / "val.de.gz", "rt", encoding="utf-8") as f:
        de = [next(f).strip() for _ in range(12)]
    lines = (DATA / "scitldr" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    sci = [json.loads(line) for line in lines]
    sst = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:17]
    return {
        "translate": _jsonl(
            root / "translate.jsonl",
            [
                {"source": s, "target": t, "n": i}
                for i, (s, t) in enumerate(zip(en, de, strict=True))
            ],
        ),
        "summaries": _jsonl(
            root / "summaries.jsonl",
            [
                {
                    "source": " ".join(r["source"][:2])[:300],
                    "target": r["target"],
                    "sentences": r["source"],
                }
                for r in sci
            ],
        ),
        "sentiment": _jsonl(
            root / "sentiment.jsonl",
            [
                {
                    "sentence": s.split("\t")[0].strip(),
                    "label": int(s.split("\t")[1]),
                    "tags": ["x"],
                }
                for s in sst
            ],
        ),
    }


def _tokenizer(mlm: bool) -> PreTrainedTokenizerFast:
    corpus = (DATA / "multi30k" / "val.en.gz").read_bytes()
    import gzip

    lines = gzip.decompress(corpus).decode("utf-8").splitlines()
    lines += gzip.decompress((DATA / "multi30k" / "val.de.gz").read_bytes()).decode().splitlines()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if mlm else ["<|endoftext|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if mlm:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    clm_tok, mlm_tok = _tokenizer(False), _tokenizer(True)
    torch.manual_seed(0)
    built = {
        "clm": (
            GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=len(clm_tok),
                    n_layer=2,
                    n_embd=32,
                    n_head=2,
                    n_positions=96,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            clm_tok,
        ),
        "mlm": (
            BertForMaskedLM(
                BertConfig(
                    vocab_size=len(mlm_tok),
                    num_hidden_layers=1,
                    hidden_size=32,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=64,
                )
            ),
            mlm_tok,
        ),
        "classifier": (
            BertForSequenceClassification(
                BertConfig(  # type: ignore[call-arg]
                    vocab_size=len(mlm_tok),
                    num_hidden_layers=1,
                    hidden_size=32,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=64,
                    num_labels=2,
                    pad_token_id=mlm_tok.pad_token_id,
                )
            ),
            mlm_tok,
        ),
        "seq2seq": (
            T5ForConditionalGeneration(
                T5Config(  # type: ignore[call-arg]
                    vocab_size=len(clm_tok),
                    d_model=32,
                    d_ff=64,
                    d_kv=16,
                    num_layers=1,
                    num_heads=2,
                    pad_token_id=1,
                    eos_token_id=0,
                    decoder_start_token_id=1,
                )
            ),
            clm_tok,
        ),
    }
    dirs = {}
    for name, (model, tok) in built.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


def _ctx(tmp_path: Path, model_dirs: dict[str, Path], stage: str = "eval") -> StageContext:
    return StageContext(
        run_dir=tmp_path, stage=stage, kind=stage, seed=0, upstream=dict(model_dirs)
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _eval(data_file: str, metrics: list[str], models: list[str], **kw) -> EvalSpec:
    kw.setdefault("generation", {"max_new_tokens": 6, "batch_size": 5})
    return EvalSpec(
        kind="eval",
        models=models,
        data=DataSpec(files=[data_file]),
        metrics=metrics,
        **kw,
    )


def test_eval_ladder_with_generation_and_perplexity(tmp_path, model_dirs, data):
    metrics = ["bleu", "chrf", "ter", "rouge", "exact_match", "token_f1"]
    spec = _eval(data["translate"], metrics, ["clm", "seq2seq"], target_lang="de")
    result = eval_stage.run(spec, _ctx(tmp_path, model_dirs))
    assert list(result.metrics) == ["clm", "seq2seq"]
    for row in result.metrics.values():
        assert "tok:13a" in row["bleu_signature"] and row["chrf_signature"] and row["ter_signature"]
        assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "token_f1"} <= set(row)
    records = _read(tmp_path / "eval" / "predictions.jsonl")
    sources = [
        json.loads(line)["source"] for line in Path(data["translate"]).read_text().splitlines()
    ]
    for label in ("clm", "seq2seq"):
        mine = [r for r in records if r["model"] == label]
        assert [r["index"] for r in mine] == list(range(12))
        assert [r["input"] for r in mine] == sources  # input order kept
        preds, refs = [r["prediction"] for r in mine], [r["reference"] for r in mine]
        assert result.metrics[label]["bleu"] == pytest.approx(text.bleu(preds, refs)["bleu"])


def test_eval_perplexity_follows_the_spec(tmp_path, model_dirs, data):
    spec = _eval(
        data["translate"],
        ["perplexity"],
        ["clm"],
        text_column="target",
        perplexity={"window": 16, "stride": 4, "mode": "stream", "batch_size": 3},
    )
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics["clm"]
    loaded = load_for_inference(str(model_dirs["clm"]))
    targets = [
        json.loads(line)["target"] for line in Path(data["translate"]).read_text().splitlines()
    ]
    ref = perplexity.causal_lm_perplexity(
        loaded.model, loaded.tokenizer, targets, window_tokens=16, stride_tokens=4, mode="stream"
    )
    assert row["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert row["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-6)
    assert row["perplexity_tokens"] == ref.scored_tokens
    assert (
        "window=16" in row["perplexity_convention"] and "stride=4" in row["perplexity_convention"]
    )
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()  # nothing generated


def test_multi_reference_summaries_and_masked_lm(tmp_path, model_dirs, data):
    spec = _eval(data["summaries"], ["rouge", "bleu"], ["clm"], target_lang="en")
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics["clm"]
    assert row["bleu_signature"].startswith("nrefs:")
    records = _read(tmp_path / "eval" / "predictions.jsonl")
    assert all(isinstance(r["reference"], list) for r in records)
    spec = _eval(
        data["translate"], ["masked_perplexity", "pseudo_perplexity"], ["mlm"], text_column="target"
    )
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics["mlm"]
    assert row["masked_perplexity"] > 1 and row["pseudo_perplexity"] > 1
    assert "mask_seed=0" in row["masked_perplexity_convention"]


def test_classifier_accuracy_and_f1(tmp_path, model_dirs, data):
    spec = _eval(data["sentiment"], ["accuracy", "f1"], ["classifier"], input_column="sentence")
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics["classifier"]
    records = _read(tmp_path / "eval" / "predictions.jsonl")
    assert len(records) == 16
    hits = sum(r["predicted_label"] == str(r["label"]) for r in records)
    assert row["accuracy"] == pytest.approx(hits / 16)
    assert 0 <= row["f1"] <= 1


def test_greedy_batch_1_equals_batch_32(model_dirs, data):
    loaded = load_for_inference(str(model_dirs["clm"]))
    inputs = [
        json.loads(line)["source"] for line in Path(data["translate"]).read_text().splitlines()
    ]
    inputs = [s[: 5 + 7 * (i % 6)] for i, s in enumerate(inputs * 3)]  # 36 prompts, many lengths
    one = generate(
        loaded.model,
        loaded.tokenizer,
        inputs,
        GenerationSpec(max_new_tokens=8, batch_size=1),
        seed=0,
    )
    many = generate(
        loaded.model,
        loaded.tokenizer,
        inputs,
        GenerationSpec(max_new_tokens=8, batch_size=32),
        seed=0,
    )
    assert one == many
    assert len(set(one)) > 3 and all(one)  # real, input-dependent outputs
    sampling = GenerationSpec(max_new_tokens=8, batch_size=8, do_sample=True, top_k=50)
    a = generate(loaded.model, loaded.tokenizer, inputs[:8], sampling, seed=1)
    assert a == generate(loaded.model, loaded.tokenizer, inputs[:8], sampling, seed=1)
    assert a != generate(loaded.model, loaded.tokenizer, inputs[:8], sampling, seed=2)
    beams = GenerationSpec(max_new_tokens=8, batch_size=4, num_beams=3)
    assert len(generate(loaded.model, loaded.tokenizer, inputs[:4], beams, seed=0)) == 4


@pytest.mark.parametrize("model", ["clm", "seq2seq"])
def test_predict_keeps_input_order(tmp_path, model_dirs, data, model):
    spec = PredictSpec(
        kind="predict",
        model=model,
        data=DataSpec(files=[data["translate"]]),
        reference_column="target",
        generation=GenerationSpec(max_new_tokens=6, batch_size=4),
    )
    ctx = _ctx(tmp_path, model_dirs, stage="predict")
    result = predict_stage.run(spec, ctx)
    records = _read(ctx.predictions_path)
    rows = [json.loads(line) for line in Path(data["translate"]).read_text().splitlines()]
    assert result.metrics["predictions"] == 12
    assert [r["input"] for r in records] == [row["source"] for row in rows]
    assert [r["reference"] for r in records] == [row["target"] for row in rows]
    loaded = load_for_inference(str(model_dirs[model]))
    for rec in records[:3] + records[-2:]:  # each equals generating that input alone
        alone = generate(loaded.model, loaded.tokenizer, [rec["input"]], spec.generation, seed=0)
        assert rec["prediction"] == alone[0]


def test_peft_adapter_directory(tmp_path, model_dirs, data):
    from peft import LoraConfig, get_peft_model

    base = GPT2LMHeadModel.from_pretrained(model_dirs["clm"])
    config = LoraConfig(
        r=4, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(tmp_path / "adapter")
    spec = _eval(
        data["translate"], ["perplexity"], ["clm", str(tmp_path / "adapter")], text_column="target"
    )
    ladder = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics
    loaded = load_for_inference(str(tmp_path / "adapter"))
    assert loaded.kind == "clm"
    targets = [
        json.loads(line)["target"] for line in Path(data["translate"]).read_text().splitlines()
    ]
    direct = perplexity.causal_lm_perplexity(adapted.eval(), loaded.tokenizer, targets)
    assert ladder[str(tmp_path / "adapter")]["perplexity"] == pytest.approx(
        direct.perplexity, rel=1e-5
    )
    assert not math.isclose(ladder["clm"]["perplexity"], direct.perplexity, rel_tol=1e-3)


def test_soft_prompt_adapter_generates_like_manual_greedy(tmp_path, model_dirs, data):
    from peft import PromptTuningConfig, get_peft_model

    base = GPT2LMHeadModel.from_pretrained(model_dirs["clm"])
    soft = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for weight in soft.prompt_encoder.parameters():
            weight.normal_()
    soft.save_pretrained(tmp_path / "soft")
    spec = PredictSpec(
        kind="predict",
        model=str(tmp_path / "soft"),
        data=DataSpec(files=[data["translate"]]),
        generation=GenerationSpec(max_new_tokens=5, batch_size=4),
    )
    ctx = _ctx(tmp_path, model_dirs, stage="predict")
    predict_stage.run(spec, ctx)
    records = _read(ctx.predictions_path)
    loaded = load_for_inference(str(tmp_path / "soft"))
    tok, model = loaded.tokenizer, loaded.model.eval()
    virtual = soft.get_prompt(batch_size=1).detach()
    for rec in records[:2]:  # greedy by hand: [virtual tokens] + ids, no cache, no padding
        ids = tok(rec["input"])["input_ids"]
        for _ in range(5):
            embeds = torch.cat([virtual, base.get_input_embeddings()(torch.tensor([ids]))], dim=1)
            with torch.no_grad():
                ids.append(int(base(inputs_embeds=embeds).logits[0, -1].argmax()))
        new = ids[len(tok(rec["input"])["input_ids"]) :]
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert rec["prediction"] == tok.decode(new, skip_special_tokens=True).strip()
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_prompted_model_rank_classification(tmp_path, model_dirs, data):
    prompting = pytest.importorskip("mlsteps.prompt.prompter")
    prompter = prompting.Prompter(
        method="zero_shot",
        template="Review: {sentence} Sentiment:",
        task="classification",
        verbalizer={"0": "bad", "1": "good"},
        target_column="label",
        base_model=str(model_dirs["clm"]),
    )
    final = tmp_path / "prompted"
    final.mkdir()
    prompting.save_prompter(prompter, final)
    spec = _eval(data["sentiment"], ["accuracy", "f1"], [str(final)])
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics[str(final)]
    records = _read(tmp_path / "eval" / "predictions.jsonl")
    assert {r["predicted_label"] for r in records} <= {"0", "1"}
    assert records[0]["input"].startswith("Review: ")  # rendered through the prompter
    assert row["accuracy"] == pytest.approx(
        sum(r["predicted_label"] == str(r["label"]) for r in records) / 16
    )


def test_prompted_model_generation(tmp_path, model_dirs, data):
    prompting = pytest.importorskip("mlsteps.prompt.prompter")
    prompter = prompting.Prompter(
        method="zero_shot", template="English: {source} German:", base_model=str(model_dirs["clm"])
    )
    final = tmp_path / "prompted"
    final.mkdir()
    prompting.save_prompter(prompter, final)
    spec = _eval(data["translate"], ["bleu"], [str(final)], input_column="absent")
    row = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics[str(final)]
    records = _read(tmp_path / "eval" / "predictions.jsonl")
    assert records[0]["input"].startswith("English: ") and records[0]["input"].endswith("German:")
    assert row["bleu"] == pytest.approx(
        text.bleu([r["prediction"] for r in records], [r["reference"] for r in records])["bleu"]
    )


def test_prompted_model_perplexity_needs_no_template_columns(tmp_path, model_dirs, data):
    """Perplexity scores text_column as is: a model carrying an SFT/prompt template is scored
    on plain text without that template's columns, and equals its base model's score."""
    prompting = pytest.importorskip("mlsteps.prompt.prompter")
    prompter = prompting.Prompter(
        method="zero_shot", template="English: {source} German:", base_model=str(model_dirs["clm"])
    )
    final = tmp_path / "prompted"
    final.mkdir()
    prompting.save_prompter(prompter, final)
    spec = _eval(data["sentiment"], ["perplexity"], [str(final), "clm"], text_column="sentence")
    ladder = eval_stage.run(spec, _ctx(tmp_path, model_dirs)).metrics
    assert ladder[str(final)]["perplexity"] == pytest.approx(ladder["clm"]["perplexity"])
    # Generation does render the template, so there the missing column is still an error.
    bleu = _eval(data["sentiment"], ["bleu"], [str(final)], reference_column="sentence")
    with pytest.raises(UserError, match="source"):
        eval_stage.run(bleu, _ctx(tmp_path / "b", model_dirs))


def _bad(tmp_path, model_dirs, spec, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        eval_stage.run(spec, _ctx(tmp_path, model_dirs))
    assert str(err.value).startswith("stages.eval.") and "\n" not in str(err.value)
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()


def test_metric_must_fit_the_model(tmp_path, model_dirs, data):
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["sentiment"], ["perplexity"], ["classifier"]),
        "'perplexity' does not fit model 'classifier'",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["translate"], ["bleu"], ["clm", "mlm"]),
        "'bleu' does not fit model 'mlm', a masked LM",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["translate"], ["pseudo_perplexity"], ["clm"]),
        "does not fit model 'clm'",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["sentiment"], ["accuracy"], ["clm"]),
        "'accuracy' does not fit",
    )


def test_lengths_that_cannot_fit_fail_before_work(tmp_path, model_dirs, data):
    too_long = _eval(
        data["translate"], ["perplexity"], ["clm"], text_column="target", perplexity={"window": 200}
    )
    _bad(
        tmp_path,
        model_dirs,
        too_long,
        "perplexity.window 200 exceeds the 96 positions of model 'clm'",
    )
    gen = _eval(data["translate"], ["bleu"], ["clm"], generation={"max_new_tokens": 96})
    _bad(tmp_path, model_dirs, gen, "max_new_tokens 96 leaves no room")


def test_bad_columns_and_metric_names(tmp_path, model_dirs, data):
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["translate"], ["bleu"], ["clm"], reference_column="tgt"),
        "column 'tgt' not found",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["translate"], ["perplexity"], ["clm"]),
        "column 'text' not found",
    )
    # A list column where text is expected, and the reverse kinds of mismatch.
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["summaries"], ["bleu"], ["clm"], input_column="sentences"),
        "'sentences' row 0 is a list, expected text",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["summaries"], ["perplexity"], ["clm"], text_column="target"),
        "'target' row 0 is a list, expected text",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(
            data["sentiment"],
            ["accuracy"],
            ["classifier"],
            input_column="sentence",
            label_column="tags",
        ),
        "expected a single label",
    )
    _bad(
        tmp_path,
        model_dirs,
        _eval(data["translate"], ["bleu"], ["clm"], reference_column="n"),
        "expected a string or a list of strings",
    )
    _bad(tmp_path, model_dirs, _eval(data["translate"], ["bleu"], ["clm", "clm"]), "listed twice")
    (tmp_path / "empty").mkdir()
    empty = _eval(data["translate"], ["bleu"], [str(tmp_path / "empty")])
    _bad(tmp_path, model_dirs, empty, "is not a model directory")
    with pytest.raises(ValidationError, match="did you mean 'bleu'"):
        _eval(data["translate"], ["bleuu"], ["clm"])
    unchecked = EvalSpec.model_construct(
        **{**_eval(data["translate"], ["bleu"], ["clm"]).__dict__, "metrics": ["rougee"]}
    )
    _bad(tmp_path, model_dirs, unchecked, "unknown metric 'rougee'.*did you mean 'rouge'")


def test_predict_rejects_models_that_cannot_generate(tmp_path, model_dirs, data):
    spec = PredictSpec(kind="predict", model="mlm", data=DataSpec(files=[data["sentiment"]]))
    with pytest.raises(UserError, match="neither generates text nor predicts labels"):
        predict_stage.run(spec, _ctx(tmp_path, model_dirs, stage="predict"))
    spec = PredictSpec(
        kind="predict", model="clm", data=DataSpec(files=[data["translate"]]), input_column="src"
    )
    with pytest.raises(UserError, match="column 'src' not found"):
        predict_stage.run(spec, _ctx(tmp_path, model_dirs, stage="predict"))

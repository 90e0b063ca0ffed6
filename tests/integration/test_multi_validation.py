"""Several named validation sets in a pretrain stage: each evaluated on its own, logged as
val_<name>_<metric>, usable by keep_best, plotted in the report; the recipe checks them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mlsteps.errors import UserError
from mlsteps.recipe import check_data_files, validate_recipe
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.report.plots import plot_curves
from mlsteps.stages import pretrain
from tests.integration.test_training_resume import DATA, _ctx
from tests.integration.test_training_resume import tok_dirs as tok_dirs  # noqa: F401 - fixture


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec(tmp_path: Path, validation: object, **train: object) -> PretrainSpec:
    return PretrainSpec.model_validate(
        {
            "kind": "pretrain", "objective": "clm", "tokenizer": "tok",
            "model": {"family": "gpt2", "n_layers": 2, "hidden_size": 32, "n_heads": 2,
                      "max_positions": 64},
            "data": {"files": [str(DATA)], "max_samples": 9},
            "validation": validation,
            "max_seq_len": 32,
            "train": {"batch_size": 4, "max_steps": 6, "log_every_steps": 1,
                      "eval_every_steps": 3, **train},
        }
    )  # fmt: skip


def test_each_named_set_is_evaluated_and_logged(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    wiki = {"files": [str(DATA)], "rows": "100:110"}
    other = tmp_path / "other.txt"
    other.write_text(
        "".join(f"line {i} of a text that is not wikipedia at all\n" for i in range(20))
    )
    validation = {"wiki": wiki, "other": str(other)}
    spec = _spec(tmp_path, validation, keep_best={"metric": "val_other_loss"})
    ctx = _ctx(tmp_path / "run", tok_dirs["clm"])
    result = pretrain.run(spec, ctx)
    m = result.metrics
    for name in ("wiki", "other"):
        assert m[f"val_{name}_perplexity"] == pytest.approx(
            torch.tensor(m[f"val_{name}_loss"]).exp().item(), rel=1e-6
        )
        assert f"initial_val_{name}_loss" in m
    assert m["val_wiki_loss"] != m["val_other_loss"]
    assert "val_loss" not in m and "perplexity_convention" in m
    assert m["best_step"] in (3, 6)
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    evals = [r for r in records if "val_wiki_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all("val_other_loss" in r for r in evals)

    # Each set alone as the single validation source gives the same numbers: nothing mixed.
    alone = pretrain.run(_spec(tmp_path, str(other)), _ctx(tmp_path / "alone", tok_dirs["clm"]))
    assert alone.metrics["val_loss"] == pytest.approx(m["val_other_loss"], rel=1e-5)

    assert plot_curves(ctx.stage_dir)[0] == "loss.png"


def test_unnamed_forms_still_work_and_bad_names_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "v.txt"
    data.write_text("x\n")

    def recipe(validation: object) -> dict[str, object]:
        return {
            "name": "r",
            "stages": {
                "pt": {"kind": "pretrain", "objective": "clm", "tokenizer": "gpt2",
                       "model": {"family": "gpt2"}, "data": str(data),
                       "validation": validation},
            },
        }  # fmt: skip

    for single in (str(data), {"files": str(data)}, [str(data), str(data)]):
        spec = validate_recipe(recipe(single)).stages["pt"]
        assert isinstance(spec.validation, list)
    named = validate_recipe(recipe({"a": str(data), "b": {"files": str(data)}}))
    assert set(named.stages["pt"].validation) == {"a", "b"}
    with pytest.raises(UserError):
        validate_recipe(recipe({"a b": str(data)}))
    # A missing file in a named set is found before any work, named by its set.
    missing = validate_recipe(recipe({"a": str(data), "b": str(tmp_path / "nope.txt")}))
    with pytest.raises(UserError) as err:
        check_data_files(missing)
    assert "stages.pt.validation.b" in str(err.value.where)


# ---------------------------------------------------------------- finetune and soft prompts
# The same mechanism (engine/validation_sets.py) in every stage that validates on rows: the
# Trainer evaluates a dict of sets, generation/rank evaluations are combined per set.

_TINY = {"n_layers": 2, "hidden_size": 32, "n_heads": 2, "intermediate_size": 64,
         "max_positions": 128}  # fmt: skip
_TRAIN = {"batch_size": 8, "max_steps": 4, "eval_every_steps": 2, "log_every_steps": 1,
          "save_every_steps": 1000, "lr": 3e-3}  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A byte-level BPE tokenizer and tiny 'pretrained' gpt2 and bart directories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlsteps.builtin import load_builtin
    from mlsteps.engine.modeling import build_model
    from mlsteps.recipe.specs.model import ArchSpec

    root = tmp_path_factory.mktemp("bases")
    rows = (
        load_builtin("toy/translate", "train")[:400] + load_builtin("toy/sentiment", "train")[:200]
    )
    texts = [str(v) for r in rows for v in r.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    out = {}
    for family, task in (("gpt2", "clm"), ("bart", "seq2seq")):
        torch.manual_seed(0)
        model = build_model(ArchSpec(family=family, **_TINY), tok, task)  # type: ignore[arg-type]
        model.save_pretrained(root / family)  # type: ignore[operator]
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


def _toy(name: str, split: str, rows: str) -> dict[str, object]:
    return {"builtin": name, "split": split, "rows": rows}


_TASKS: dict[str, dict[str, object]] = {
    "classification": {"data": "toy/sentiment", "from": "gpt2"},
    "seq2seq": {"data": "toy/translate", "from": "bart", "generation": {"max_new_tokens": 4}},
    "causal_lm": {"data": "toy/translate", "from": "gpt2", "template": "E: {source}\nT: ",
                  "response_column": "target", "generation": {"max_new_tokens": 4}},
    "chat": {"data": "toy/chat", "from": "gpt2", "chat_template": "chatml",
             "generation": {"max_new_tokens": 4}},
}  # fmt: skip


def _finetune(bases: dict[str, Path], task: str, validation: object, **train: object) -> Any:
    from mlsteps.recipe.specs.finetune import FinetuneSpec

    fields = dict(_TASKS[task])
    data = str(fields.pop("data"))
    fields["from"] = str(bases[str(fields["from"])])
    if task != "classification":
        fields["validation_max_samples"] = 3
    return FinetuneSpec.model_validate(
        {
            "kind": "finetune", "task": task, **fields,
            "data": _toy(data, "train", ":48"), "validation": validation,
            "train": {**_TRAIN, **train},
        }
    )  # fmt: skip


def _two_sets(task: str) -> dict[str, object]:
    data = str(_TASKS[task]["data"])
    return {"dev": _toy(data, "validation", ":6"), "test": _toy(data, "test", ":6")}


@pytest.mark.parametrize("task", list(_TASKS))
def test_finetune_logs_each_named_set(task: str, bases: dict[str, Path], tmp_path: Path) -> None:
    from mlsteps.context import StageContext
    from mlsteps.report.plots import _named_val_losses
    from mlsteps.stages import finetune

    spec = _finetune(bases, task, _two_sets(task), keep_best={"metric": "val_test_loss"})
    ctx = StageContext(run_dir=tmp_path, stage="ft", kind="finetune", seed=0, quiet=True)
    m = finetune.run(spec, ctx).metrics
    scores = ["loss"] + (["accuracy", "macro_f1"] if task == "classification" else ["bleu"])
    for name in ("dev", "test"):
        for score in scores:
            assert isinstance(m[f"val_{name}_{score}"], float), (name, score, sorted(m))
    assert "val_loss" not in m and "val_bleu" not in m
    assert m["val_dev_loss"] != m["val_test_loss"]
    # keep_best selected on a named set, among the evaluations at steps 2 and 4.
    assert m["best_step"] in (2, 4)
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    # The Trainer logs each set of an evaluation as its own record (same step).
    dev = {r["step"]: r["val_dev_loss"] for r in records if "val_dev_loss" in r}
    test = {r["step"]: r["val_test_loss"] for r in records if "val_test_loss" in r}
    assert list(dev) == list(test) == [2, 4]
    best_step = min(test, key=lambda s: test[s])
    assert m["best_step"] == best_step and m["best_value"] == test[best_step]
    assert set(_named_val_losses(records)) == {"dev", "test"}
    assert plot_curves(ctx.stage_dir)[0] == "loss.png"
    if task != "classification":
        for name in ("dev", "test"):
            assert m[f"val_{name}_bleu_signature"].startswith("nrefs")
            preds = ctx.stage_dir / f"predictions_{name}.jsonl"
            assert len(preds.read_text().splitlines()) == 3


def test_finetune_named_set_equals_it_alone(bases: dict[str, Path], tmp_path: Path) -> None:
    """Set 'test' among two gives the numbers it gives as the only validation set."""
    from mlsteps.context import StageContext
    from mlsteps.stages import finetune

    def run(validation: object, where: str) -> dict[str, Any]:
        ctx = StageContext(
            run_dir=tmp_path / where, stage="ft", kind="finetune", seed=0, quiet=True
        )
        return finetune.run(_finetune(bases, "classification", validation), ctx).metrics

    both = run(_two_sets("classification"), "both")
    alone = run(_two_sets("classification")["test"], "alone")
    assert alone["val_loss"] == pytest.approx(both["val_test_loss"], rel=1e-5)
    assert alone["val_accuracy"] == both["val_test_accuracy"]


def test_soft_prompt_logs_each_named_set(bases: dict[str, Path], tmp_path: Path) -> None:
    from mlsteps.context import StageContext
    from mlsteps.recipe.specs.prompt import PromptSpec
    from mlsteps.stages import prompt

    spec = PromptSpec.model_validate(
        {
            "kind": "prompt", "method": "prompt_tuning", "from": "base", "task": "classification",
            "template": "{text} =>", "target_column": "label", "num_virtual_tokens": 4,
            "verbalizer": {"positive": "good", "negative": "bad"},
            "data": _toy("toy/sentiment", "train", ":32"),
            "validation": _two_sets("classification"), "max_seq_len": 64,
            "train": {**_TRAIN, "lr": 3e-2, "keep_best": {"metric": "val_dev_accuracy"}},
        }
    )  # fmt: skip
    ctx = StageContext(
        run_dir=tmp_path, stage="pt", kind="prompt", seed=0, quiet=True,
        upstream={"base": bases["gpt2"]},
    )  # fmt: skip
    m = prompt.run(spec, ctx).metrics
    for name in ("dev", "test"):
        for score in ("loss", "accuracy"):
            assert isinstance(m[f"val_{name}_{score}"], float), (name, score, sorted(m))
    assert "val_loss" not in m and m["best_step"] in (2, 4)
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    acc = {r["step"]: r["val_dev_accuracy"] for r in records if "val_dev_accuracy" in r}
    assert list(acc) == [2, 4]
    assert m["best_value"] == max(acc.values())
    assert plot_curves(ctx.stage_dir)[0] == "loss.png"

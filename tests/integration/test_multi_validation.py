"""Several named validation sets in a pretrain stage: each evaluated on its own, logged as
val_<name>_<metric>, usable by keep_best, plotted in the report; the recipe checks them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mlsteps.errors import UserError
from mlsteps.recipe import check_data_files, validate_recipe
from mlsteps.report_plots import plot_curves
from mlsteps.specs.pretrain import PretrainSpec
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

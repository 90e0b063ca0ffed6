"""train.keep_best and train.early_stopping on the real pretrain stage (tiny GPT-2, real text):
the best checkpoint survives rotation, final/ is its model, a stop after the best step resumes to
identical final weights, early stopping ends training and a resumed run sees that it ended."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlsteps.engine import checkpoints as ckpt
from mlsteps.errors import StageFailed, StageInterrupted, UserError
from mlsteps.recipe import validate_recipe
from mlsteps.recipe.specs.pretrain import PretrainSpec
from tests.integration.test_training_resume import _ctx, _spec
from tests.integration.test_training_resume import tok_dirs as tok_dirs  # noqa: F401 - fixture

MAX_STEPS = 14


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _best_spec(**train: object) -> PretrainSpec:
    base = {"eval_every_steps": 2, "save_every_steps": 3, "keep_checkpoints": 1}
    return _spec("clm", **{**base, **train})


def _val_losses(metrics_path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r and r["step"] > 0}


def _run(spec: PretrainSpec, run_dir: Path, tok: Path, stop_at: int = 0):  # type: ignore[no-untyped-def]
    from mlsteps.stages import pretrain

    ctx = _ctx(run_dir, tok, stop_at=stop_at)
    return ctx, pretrain.run(spec, ctx)


def test_best_checkpoint_survives_rotation_and_becomes_final(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    # Validation loss falls throughout these 14 steps; "best" as the highest loss (mode max)
    # makes the best model an early one that is not a checkpoint step (2), so rotation
    # (keep_checkpoints 1) would remove it and final/ must differ from the last step.
    spec = _best_spec(keep_best={"metric": "val_loss", "mode": "max"})
    ctx, result = _run(spec, tmp_path / "a", tok_dirs["clm"])
    losses = _val_losses(ctx.metrics_path)
    best_step = max(losses, key=lambda s: losses[s])
    assert 0 < best_step < MAX_STEPS, losses
    assert result.metrics["best_step"] == best_step
    assert result.metrics["best_value"] == pytest.approx(losses[best_step])
    assert result.metrics["val_loss"] == pytest.approx(losses[best_step])  # describes final/
    best_dir = ctx.checkpoints_dir / f"checkpoint-{best_step}"
    # keep_checkpoints is 1: only the newest and the best are left, both complete and verified.
    kept = [ckpt.checkpoint_step(c) for c in ckpt.list_checkpoints(ctx.checkpoints_dir)]
    assert kept == [best_step, MAX_STEPS]
    assert ckpt.checkpoint_problem(best_dir) is None
    final = load_file(str(ctx.final_dir / "model.safetensors"))
    best = load_file(str(best_dir / "model.safetensors"))
    last = load_file(str(ctx.checkpoints_dir / f"checkpoint-{MAX_STEPS}" / "model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)

    # Stopped after the best step (at a step that is not a checkpoint step), then resumed:
    # the same best step and bit-identical final weights.
    stop_at = best_step + 3
    with pytest.raises(StageInterrupted):
        _run(spec, tmp_path / "b", tok_dirs["clm"], stop_at=stop_at)
    ctx_b, result_b = _run(spec, tmp_path / "b", tok_dirs["clm"])
    assert result_b.metrics["best_step"] == best_step
    final_b = load_file(str(ctx_b.final_dir / "model.safetensors"))
    assert all(torch.equal(final[k], final_b[k]) for k in final)


def test_early_stopping_ends_training_and_resume_sees_it(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    # min_delta larger than any change: the evaluation after the first one is "no improvement".
    spec = _best_spec(early_stopping={"patience": 1, "min_delta": 100.0})
    ctx, result = _run(spec, tmp_path / "a", tok_dirs["clm"])
    assert result.metrics["global_step"] == 4
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    assert max(r["step"] for r in records) == 4
    stop_dir = ctx.checkpoints_dir / "checkpoint-4"
    assert ckpt.checkpoint_problem(stop_dir) is None
    weights = load_file(str(ctx.final_dir / "model.safetensors"))
    # Killed after the stop, before final/: the rerun does not train on past the stop.
    (ctx.final_dir / "model.safetensors").unlink()
    _, again = _run(spec, tmp_path / "a", tok_dirs["clm"])
    assert again.metrics["global_step"] == 4
    rerun = load_file(str(ctx.final_dir / "model.safetensors"))
    assert all(torch.equal(weights[k], rerun[k]) for k in weights)


def test_unknown_best_metric_names_the_ones_there(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    spec = _best_spec(keep_best={"metric": "val_bleu"})
    with pytest.raises(UserError) as err:
        _run(spec, tmp_path / "a", tok_dirs["clm"])
    assert err.value.where == "stages.pretrain.train.keep_best.metric"
    assert "val_loss" in str(err.value.hint)


def _recipe(train: str, validation: str = "validation_fraction: 0.1") -> str:
    return f"""
name: r
stages:
  pt:
    kind: pretrain
    objective: clm
    tokenizer: gpt2
    model: {{family: gpt2}}
    data: x.txt
    {validation}
    train: {train}
"""


@pytest.mark.parametrize(
    ("train", "validation", "message"),
    [
        ("{early_stopping: {patience: 2}}", "validation_fraction: 0.1", "eval_every_steps"),
        ("{keep_best: {metric: val_loss}}", "validation_fraction: 0.1", "eval_every_steps"),
        ("{eval_every_steps: 5, early_stopping: {patience: 2}}", "validation_fraction: 0",
         "no validation rows"),
        ("{eval_every_steps: 5, keep_best: {metric: loss}}", "validation_fraction: 0.1",
         "val_loss"),
    ],
)  # fmt: skip
def test_recipe_checks(train: str, validation: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        validate_recipe(yaml.safe_load(_recipe(train, validation)))
    assert message in str(err.value) + str(err.value.hint)


def test_a_damaged_best_checkpoint_is_refused_not_used(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    spec = _best_spec(keep_best={"metric": "val_loss", "mode": "max"})
    with pytest.raises(StageInterrupted):
        _run(spec, tmp_path / "c", tok_dirs["clm"], stop_at=5)
    weights = tmp_path / "c" / "pretrain" / "checkpoints" / "checkpoint-2" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(StageFailed, match="checkpoint-2 cannot be used"):
        _run(spec, tmp_path / "c", tok_dirs["clm"])
    assert not (tmp_path / "c" / "pretrain" / "final").exists()

"""train.report_to through the Trainer's TensorBoard and MLflow integrations, offline: what they
wrote is read back (TensorBoard's EventAccumulator, MLflow's file store); a stage stopped and
resumed keeps logging into the same MLflow run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mlsteps.errors import StageInterrupted
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.report import _links
from mlsteps.stages import pretrain
from tests.integration.test_training_resume import _ctx, _spec
from tests.integration.test_training_resume import tok_dirs as tok_dirs  # noqa: F401 - fixture

MAX_STEPS = 14


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_recipe(run_dir: Path, spec: PretrainSpec) -> None:
    """recipe.yaml as the runner writes it (the resolved stage spec the trackers log)."""
    run_dir.mkdir(parents=True)
    stages = {"pretrain": spec.model_dump(mode="json", by_alias=True)}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": run_dir.name, "stages": stages}))


@pytest.fixture(autouse=True)
def no_tracker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def test_tensorboard_logs_steps_hparams_and_final_metrics(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = _spec("clm", report_to=["tensorboard"], eval_every_steps=7)
    ctx = _ctx(tmp_path / "run", tok_dirs["clm"])
    _write_recipe(ctx.run_dir, spec)
    # Stopped at step 5 (checkpoint 3), resumed: the log continues in the same directory.
    with pytest.raises(StageInterrupted):
        pretrain.run(spec, _ctx(tmp_path / "run", tok_dirs["clm"], stop_at=5))
    result = pretrain.run(spec, ctx)
    logdir = ctx.stage_dir / "tensorboard"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    logged = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    for record in logged:
        if "loss" in record:
            assert losses[record["step"]] == pytest.approx(record["loss"], rel=1e-6)
    final = acc.Scalars("final/train_loss")
    assert final[-1].step == MAX_STEPS
    assert final[-1].value == pytest.approx(result.metrics["train_loss"], rel=1e-6)
    assert "final/val_perplexity" in tags["scalars"]
    # The hparams plugin record carries the resolved stage spec.
    hparams = acc.PluginTagToContent("hparams")
    assert hparams, tags
    blob = b"".join(hparams.values())
    assert b"train.max_steps" in blob and b"model.family" in blob
    # report.md links the logs.
    assert "[tensorboard](pretrain/tensorboard)" in _links(ctx.run_dir, "pretrain")


def test_mlflow_run_per_stage_resumed_run_continues(
    tmp_path: Path,
    tok_dirs: dict[str, Path],  # noqa: F811
) -> None:
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    spec = _spec("clm", report_to=["mlflow"])
    run_dir = tmp_path / "myrecipe"
    _write_recipe(run_dir, spec)
    # Stopped at step 5 (checkpoint 3), then resumed: one run with the whole history.
    with pytest.raises(StageInterrupted):
        pretrain.run(spec, _ctx(run_dir, tok_dirs["clm"], stop_at=5))
    ctx = _ctx(run_dir, tok_dirs["clm"])
    result = pretrain.run(spec, ctx)
    uri = (ctx.stage_dir / "mlruns").resolve().as_uri()
    assert mlflow.active_run() is None
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "myrecipe/pretrain"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(MAX_STEPS)
    assert run.data.params["objective"] == "clm"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in history} == set(range(1, MAX_STEPS + 1))
    assert run.data.metrics["final/train_loss"] == pytest.approx(result.metrics["train_loss"])
    assert run.data.metrics["final/global_step"] == MAX_STEPS


def test_tracker_without_its_package_is_refused_before_work() -> None:
    import importlib.util

    from mlsteps.errors import UserError
    from mlsteps.recipe import validate_recipe

    if importlib.util.find_spec("dvclive") is not None:
        pytest.skip("dvclive is installed here")
    raw = {
        "name": "r",
        "stages": {
            "pt": {
                "kind": "pretrain", "objective": "clm", "tokenizer": "gpt2",
                "model": {"family": "gpt2"}, "data": "x.txt",
                "train": {"report_to": ["tensorboard", "dvclive"]},
            }
        },
    }  # fmt: skip
    with pytest.raises(UserError) as err:
        validate_recipe(raw)
    assert "dvclive package is not installed" in str(err.value)
    assert "stages.pt.train.report_to.1" in str(err.value.where)

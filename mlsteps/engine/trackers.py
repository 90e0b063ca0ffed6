"""Experiment trackers (``train.report_to``) through the transformers Trainer's own integrations.

The Trainer's callbacks (TensorBoardCallback, MLflowCallback, WandbCallback, ...) do the logging
of every training and evaluation record; this module only gives them what a batch pipeline
needs and the Trainer does not set:

- one tracker run per stage, named ``<recipe>/<stage>`` (``TrainingArguments.run_name``);
- local, offline destinations under the stage directory unless the user's environment names one:
  TensorBoard event files in ``<stage>/tensorboard`` (``TENSORBOARD_LOGGING_DIR`` wins), MLflow's
  file store ``file:<stage>/mlruns`` (``MLFLOW_TRACKING_URI`` wins);
- the resolved stage spec (recipe.yaml's entry for the stage) as hyperparameters, and the stage's
  final training metrics at the end;
- resume: an interrupted stage continues the same MLflow run (its id is kept in
  ``<stage>/trackers.json``); TensorBoard appends a new event file to the same directory, which
  TensorBoard reads as one run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from mlsteps import distributed
from mlsteps.context import StageContext
from mlsteps.recipe.specs.train import TrainSpec

STATE_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


def run_name(ctx: StageContext) -> str:
    """``<recipe>/<stage>``; the recipe name comes from the run's state.json."""
    name = ctx.run_dir.name
    try:
        state = json.loads((ctx.run_dir / "state.json").read_text(encoding="utf-8"))
        name = str(state.get("name") or name)
    except (OSError, ValueError, AttributeError):
        pass
    return f"{name}/{ctx.stage}"


def stage_params(ctx: StageContext, train: TrainSpec) -> dict[str, str]:
    """The resolved stage spec from recipe.yaml (at least its ``train`` settings), flattened to
    ``a.b.c -> value`` strings."""
    spec: dict[str, Any] = {"train": train.model_dump(mode="json")}
    try:
        recipe = yaml.safe_load((ctx.run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        spec.update((recipe.get("stages") or {}).get(ctx.stage) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    flat: dict[str, str] = {"seed": str(ctx.seed)}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif value is not None:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", spec)
    return flat


class Trackers:
    """The trackers of one ``train`` call: arguments for the Trainer, setup, final logging."""

    def __init__(self, spec: TrainSpec, ctx: StageContext):
        self.names = list(spec.report_to)
        self.spec = spec
        self.ctx = ctx
        self.active = bool(self.names) and distributed.is_main()
        self._mlflow_started = False

    def training_args(self) -> dict[str, Any]:
        """``report_to`` and ``run_name`` for TrainingArguments."""
        return {"report_to": self.names or "none", "run_name": run_name(self.ctx)}

    def attach(self, trainer: Any) -> None:
        """Point the Trainer's tracker callbacks at the stage directory; start/resume MLflow."""
        if not self.active:
            return
        for callback in trainer.callback_handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
                callback.logging_dir = str(self.ctx.stage_dir / TENSORBOARD_DIR)
        if "mlflow" in self.names:
            self._start_mlflow()

    def _start_mlflow(self) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; its database
            # store needs SQLAlchemy and alembic (mlflow-skinny has neither). A local file store
            # is what an offline batch job needs; a server is one MLFLOW_TRACKING_URI away.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.ctx.stage_dir / MLFLOW_DIR).resolve().as_uri())
        saved = self._read_state().get("mlflow_run_id")
        run = None
        if saved:
            try:
                run = mlflow.start_run(run_id=saved)
            except Exception as exc:  # noqa: BLE001 - a run deleted by hand: start a new one
                self.ctx.log(f"mlflow: cannot continue run {saved} ({exc}); starting a new run")
        if run is None:
            run = mlflow.start_run(run_name=run_name(self.ctx))
            # Started here, so the Trainer's callback logs into it and leaves ending it to us.
            mlflow.log_params(stage_params(self.ctx, self.spec))
        self._mlflow_started = True
        self._write_state({"mlflow_run_id": run.info.run_id})

    def finish(self, trainer: Any, metrics: dict[str, Any], status: str = "FINISHED") -> None:
        """Log the stage's final metrics (and TensorBoard's hparams) and close the runs."""
        if not self.active:
            return
        final = {
            f"final/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for callback in trainer.callback_handler.callbacks:
            name = type(callback).__name__
            if name == "TensorBoardCallback" and status == "FINISHED":
                if callback.tb_writer is None:
                    callback._init_summary_writer(trainer.args)
                # The hparams plugin view: the stage spec next to its final metrics (also
                # written as scalars final/* at the last step).
                callback.tb_writer.add_hparams(
                    stage_params(self.ctx, self.spec),
                    final,
                    run_name=".",
                    global_step=int(metrics.get("global_step", 0)),
                )
            if name == "TensorBoardCallback" and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
            if name == "WandbCallback" and status == "FINISHED":
                wandb = callback._wandb
                if getattr(wandb, "run", None) is not None:
                    wandb.config.update(stage_params(self.ctx, self.spec), allow_val_change=True)
                    wandb.run.summary.update(final)
        if self._mlflow_started:
            import mlflow

            if status == "FINISHED":
                mlflow.log_metrics(final, step=int(metrics.get("global_step", 0)))
            mlflow.end_run(status=status)
            self._mlflow_started = False

    def locations(self) -> dict[str, str]:
        """Where the local logs are (for the stage's outputs)."""
        out = {}
        if "tensorboard" in self.names:
            out["tensorboard"] = str(self.ctx.stage_dir / TENSORBOARD_DIR)
        if "mlflow" in self.names and not os.environ.get("MLFLOW_TRACKING_URI"):
            out["mlflow"] = (self.ctx.stage_dir / MLFLOW_DIR).resolve().as_uri()
        return out

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.ctx.stage_dir / STATE_FILE).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self, data: dict[str, Any]) -> None:
        from mlsteps.rundir import atomic_write_json

        atomic_write_json(self.ctx.stage_dir / STATE_FILE, {**self._read_state(), **data})

"""Best checkpoint (``train.keep_best``) and early stopping (``train.early_stopping``).

The Trainer's own mechanism (``metric_for_best_model``, ``load_best_model_at_end``,
``EarlyStoppingCallback``) needs its evaluation cadence (``eval_strategy``) and its checkpoint
rotation; mlsteps drives both itself (evaluations from ``MlstepsCallback``, rotation over
complete checkpoints only). This callback is the same logic on that machinery:

- after each evaluation, a new best value (by more than ``min_delta``) asks for a checkpoint at
  that step, so the best model always exists as a complete, verified checkpoint;
- rotation never removes the best checkpoint (``Shared.protected_steps``);
- the state (best step, value, the best evaluation's metrics, evaluations without improvement,
  whether training stopped early) is written into every checkpoint as ``mlsteps_best.json``
  before its COMPLETE manifest, so a resumed run continues exactly where the killed one was;
- ``load_best`` puts the best checkpoint's weights into the model for final/, after checking it
  like any checkpoint that is resumed from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from transformers import TrainerCallback

from mlsteps import distributed
from mlsteps.engine import checkpoints as ckpt
from mlsteps.engine.train_callbacks import Shared
from mlsteps.errors import StageFailed, UserError
from mlsteps.recipe.specs.train import KeepBestSpec, TrainSpec

BEST_FILE = "mlsteps_best.json"


def read_best(checkpoint: Path | None) -> dict[str, Any]:
    """The best-checkpoint state stored in ``checkpoint`` ({} if none)."""
    if checkpoint is None:
        return {}
    try:
        data = json.loads((checkpoint / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stopped_early(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the step at which early stopping ended training."""
    return bool(read_best(checkpoint).get("stopped_early"))


class BestCallback(TrainerCallback):
    """Tracks the best evaluation; asks for its checkpoint; stops early when told to."""

    def __init__(self, spec: TrainSpec, shared: Shared, resume: Path | None):
        self.keep = spec.keep_best is not None
        self.rule = spec.keep_best or KeepBestSpec()
        self.mode = self.rule.direction()
        self.early = spec.early_stopping
        self.keep_checkpoints = spec.keep_checkpoints
        self.shared = shared
        self.state: dict[str, Any] = {
            "metric": self.rule.metric,
            "mode": self.mode,
            "step": None,
            "value": None,
            "metrics": {},
            "bad_evals": 0,
            "stopped_early": False,
        }
        self.state.update(read_best(resume))
        self._protect()

    @property
    def best_step(self) -> int | None:
        return cast(int | None, self.state["step"])

    def _protect(self) -> None:
        self.shared.protected_steps = {self.best_step} if self.keep and self.best_step else set()

    def _improved(self, value: float, margin: float) -> bool:
        best = self.state["value"]
        if best is None:
            return True
        return bool(value < best - margin if self.mode == "min" else value > best + margin)

    def after_eval(self, state: Any, control: Any) -> None:
        """Called by the trainer after every evaluation with ``Shared.last_eval`` filled (the
        Trainer's ``on_evaluate`` does not run for stages that only have ``extra_eval``)."""
        found = self.shared.last_eval
        raw = found.get(self.rule.metric)
        if not _number(raw):
            names = sorted(k for k, v in found.items() if k.startswith("val_") and _number(v))
            raise UserError(
                f"validation metric {self.rule.metric!r} was not computed by this stage",
                field="train.keep_best.metric",  # raised while the stage trains
                hint=f"use one of: {', '.join(names) or 'val_loss'}",
            )
        value = float(raw)  # type: ignore[arg-type]
        step = state.global_step
        if step == 0:
            return  # the evaluation before training (eval_at_start) has no checkpoint
        margin = self.early.min_delta if self.early is not None else 0.0
        if self._improved(value, margin):
            self.state["bad_evals"] = 0
        else:
            self.state["bad_evals"] += 1
        if self._improved(value, 0.0):
            self.state.update(
                step=step,
                value=value,
                metrics={k: v for k, v in found.items() if k.startswith("val_") and _number(v)},
            )
            self._protect()
            if self.keep and step < state.max_steps:
                control.should_save = True  # the best model must exist as a checkpoint
        if self.early is not None and self.state["bad_evals"] >= self.early.patience:
            self.shared.ctx.log(
                f"early stopping at step {step}: {self.rule.metric} has not improved for "
                f"{self.state['bad_evals']} evaluations (best {self.state['value']:.6g} at step "
                f"{self.best_step})"
            )
            self.state["stopped_early"] = True
            control.should_training_stop = True
            control.should_save = True  # a resumed run must see that training ended here

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Runs before MlstepsCallback.on_save, which writes the COMPLETE manifest over it.
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and distributed.is_main():
            (checkpoint / BEST_FILE).write_text(json.dumps(self.state), encoding="utf-8")

    def load_best(self, trainer: Any, final_step: int) -> dict[str, Any]:
        """Load the best checkpoint's weights when it is not the last step; returns the metrics
        that describe final/ (best_step, best_value and the best evaluation's val_*)."""
        if not self.keep or self.best_step is None:
            return {}
        out: dict[str, Any] = {"best_step": self.best_step, "best_value": self.state["value"]}
        out.update(self.state["metrics"])
        checkpoints_dir = Path(trainer.args.output_dir)
        if distributed.is_main():
            # The last evaluation may have found a new best after the last save's rotation:
            # the former best is not needed any more.
            ckpt.rotate_checkpoints(checkpoints_dir, self.keep_checkpoints, {self.best_step})
        if self.best_step == final_step:
            return out
        checkpoint = checkpoints_dir / f"checkpoint-{self.best_step}"
        problem = ckpt.checkpoint_problem(checkpoint)
        if problem is not None:
            raise StageFailed(
                f"the best checkpoint {checkpoint} cannot be used: {problem}",
                hint=f"delete {checkpoint.parent.parent} to train the stage again",
            )
        self.shared.ctx.log(
            f"final/ is the best checkpoint: step {self.best_step}, "
            f"{self.rule.metric} {self.state['value']:.6g}"
        )
        trainer._load_from_checkpoint(str(checkpoint))
        return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

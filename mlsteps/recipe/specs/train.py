"""The ``train:`` block: optimisation settings for the Trainer, experiment trackers, the best
checkpoint and early stopping."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mlsteps.recipe.specs.base import (
    Bool,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Strict,
    Unused,
)

Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "clearml", "dvclive"]


def _tracker_missing(name: str) -> str | None:
    """Why tracker ``name`` cannot log here (its package is missing), or None. No import."""
    import importlib.util

    modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
    if any(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return f"the {modules[0]} package is not installed"


class KeepBestSpec(Strict):
    """Which validation metric picks the best checkpoint."""

    metric: str = Field(
        "val_loss",
        description="A validation metric as written to metrics.jsonl, e.g. val_loss, "
        "val_perplexity, val_accuracy, val_bleu, val_<set>_loss for a named validation set.",
    )
    mode: Literal["min", "max"] | None = Field(
        None,
        description="min: lower is better, max: higher is better; default min for names with "
        "loss, perplexity, ter or bits_per_byte, else max.",
    )

    @field_validator("metric")
    @classmethod
    def _is_validation_metric(cls, value: str) -> str:
        if not value.startswith("val_"):
            raise ValueError(
                f"{value!r} is not a validation metric: give its val_ name, e.g. 'val_{value}'"
            )
        return value

    def direction(self) -> Literal["min", "max"]:
        """The mode, given or inferred from the metric's name."""
        if self.mode is not None:
            return self.mode
        lower = ("loss", "perplexity", "ter", "bits_per_byte")
        return "min" if any(w in self.metric for w in lower) else "max"


class EarlyStoppingSpec(Strict):
    """Stop training once the validation metric stops improving."""

    patience: PositiveInt = Field(
        3, description="Evaluations without an improvement larger than min_delta before stopping."
    )
    min_delta: NonNegativeFloat = Field(
        0.0, description="The smallest change of the metric that counts as an improvement."
    )


class TrainSpec(Strict):
    """Optimisation settings passed to the transformers Trainer."""

    lr: PositiveFloat = Field(5e-4, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Linear warmup steps.")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    batch_size: PositiveInt = Field(8, description="Per-device batch size (sequences).")
    grad_accum_steps: PositiveInt = Field(1, description="Gradient accumulation steps.")
    max_grad_norm: NonNegativeFloat = Field(
        1.0, description="Gradient clipping norm (0 disables clipping)."
    )
    max_steps: PositiveInt | None = Field(
        None, description="Total optimizer steps; replaces 'epochs' (do not give both)."
    )
    epochs: PositiveFloat = Field(1.0, description="Number of passes over the training data.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' uses bf16 where the hardware supports it, else fp32."
    )
    fused_adamw: Bool = Field(
        True, description="Use fused AdamW where torch provides it (faster optimizer step)."
    )
    compile: Bool = Field(False, description="Wrap the model with torch.compile.")
    gradient_checkpointing: Bool = Field(
        False, description="Trade compute for memory by recomputing activations."
    )
    eval_every_steps: PositiveInt | None = Field(
        None, description="Evaluate on the validation split every N steps (and always at the end)."
    )
    save_every_steps: PositiveInt = Field(
        200, description="Write a resumable checkpoint every N optimizer steps."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Keep the newest K complete checkpoints.")
    log_every_steps: PositiveInt = Field(10, description="Log training metrics every N steps.")
    group_by_length: Bool = Field(
        True, description="Batch examples of similar length together (less padding)."
    )
    dataloader_workers: NonNegativeInt = Field(0, description="DataLoader worker processes.")
    # Experiment tracking, best checkpoint and early stopping (engine/trackers.py, engine/best.py).
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers the Trainer logs to, one run per stage named "
        "'<recipe>/<stage>' with the stage config as hyperparameters: tensorboard (event files "
        "in <stage>/tensorboard), mlflow (file:<stage>/mlruns unless MLFLOW_TRACKING_URI is "
        "set), wandb, trackio, comet_ml, clearml, dvclive. Default none: nothing logs in or "
        "reaches the network.",
    )
    keep_best: KeepBestSpec | None = Field(
        None,
        description="Keep the checkpoint with the best validation metric through rotation and "
        "make final/ that model (metrics best_step, best_value). Needs validation and "
        "eval_every_steps.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None,
        description="Stop when the keep_best metric (else val_loss, lower is better) has not "
        "improved for 'patience' evaluations. Needs validation and eval_every_steps.",
    )

    def _ignored(self) -> list[Unused]:
        if self.max_steps is None:
            return []
        return self._unused(("epochs",), "max_steps is set and wins", "remove one of them")

    def _invalid(self) -> list[Unused]:
        out: list[Unused] = []
        for i, name in enumerate(self.report_to):
            missing = _tracker_missing(name)
            if missing:
                fix = "pip install 'mlsteps[trackers]' (tensorboard, mlflow) or remove it"
                out.append((f"report_to.{i}", f"{name}: {missing}", fix))
        for key in ("keep_best", "early_stopping"):
            if getattr(self, key) is not None and self.eval_every_steps is None:
                out.append(
                    (
                        key,
                        "needs evaluations during training (only the end is evaluated)",
                        "set train.eval_every_steps",
                    )
                )
        return out

"""Callbacks and helpers of ``engine.training``: metrics.jsonl, the NaN guard, stop requests,
checkpoint completion, throughput/MFU and the progress bar. Internal to ``engine.training``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from mlsteps import distributed
from mlsteps.context import StageContext
from mlsteps.engine import checkpoints as ckpt
from mlsteps.engine.progress import RichProgress
from mlsteps.engine.sampler import PermutationSampler
from mlsteps.errors import StageFailed
from mlsteps.recipe.specs.train import TrainSpec

RESUME_STATE_FILE = "mlsteps_state.json"
ExtraEval = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class Shared:
    """State shared by the trainer subclass and the callbacks of one ``train`` call."""

    ctx: StageContext
    extra_eval: ExtraEval | None
    loss_acc: torch.Tensor | None = None
    tokens_acc: int = 0
    tokens_total: int = 0
    step_losses: list[float] = field(default_factory=list)
    last_step_loss: float | None = None
    eval_seconds: float = 0.0
    last_eval_step: int = -1
    last_eval: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    batches_consumed: int = 0  # micro-batches trained so far (saved in checkpoints)
    flops_per_token: float | None = None
    peak_flops: float | None = None
    # engine.best: called after each evaluation; checkpoint steps rotation must keep.
    after_eval: Callable[[Any, Any], None] | None = None
    protected_steps: set[int] = field(default_factory=set)


def count_tokens(inputs: dict[str, Any]) -> int:
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return int(ids.numel())
    # Preference batches of TRL's ORPO/CPO/KTO: prompt+answer sequences under their own names
    # (the prompt_* mask would count the prompt twice).
    masks = [
        v
        for k, v in inputs.items()
        if k.endswith("attention_mask") and not k.startswith("prompt") and torch.is_tensor(v)
    ]
    return int(sum(int(m.sum()) for m in masks))


# TRL's preference metrics under names without a slash (metrics.json keys, report columns).
_TRL_NAMES = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}


def rename_metric(key: str) -> str:
    if key == "learning_rate":
        return "lr"
    key = "val_" + key[len("eval_") :] if key.startswith("eval_") else key
    for trl_name, name in _TRL_NAMES.items():
        key = key.replace(trl_name, name)
    return key.replace("/", "_")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends records to metrics.jsonl, flushing each line so a crash loses nothing logged."""

    def __init__(self, path: Path, resume_step: int | None):
        self.previous: list[dict[str, Any]] = []  # records kept from before a resume
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            # Records past the checkpoint we resume from describe steps that will be redone.
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if int(record.get("step", 0)) <= resume_step:
                        kept.append(line)
                        self.previous.append(record)
                except (ValueError, AttributeError):
                    continue
            path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        self.path = path
        self.history: list[dict[str, Any]] = []

    def forget_evaluation_at(self, step: int) -> None:
        """Drop the evaluation records of ``step`` (it is about to be evaluated again)."""
        self.previous = [
            r
            for r in self.previous
            if not (r.get("step") == step and any(k.startswith("val_") for k in r))
        ]
        self.path.write_text(
            "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.previous),
            encoding="utf-8",
        )

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, allow_nan=False) + "\n")
        self.history.append(clean)


class MlstepsCallback(TrainerCallback):
    """metrics.jsonl, NaN guard, stop requests, complete checkpoints, throughput, progress."""

    def __init__(
        self, shared: Shared, writer: JsonlWriter, spec: TrainSpec, progress: RichProgress
    ):
        self.shared = shared
        self.writer = writer
        self.spec = spec
        self.progress = progress
        self.window_tokens = 0
        self.window_start = time.perf_counter()
        self.window_eval_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.progress.start(state.max_steps, state.global_step)
        self.window_start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        shared = self.shared
        loss = float(shared.loss_acc) if shared.loss_acc is not None else float("nan")
        shared.loss_acc = None
        step = state.global_step + 1
        if not math.isfinite(loss):
            self.writer.write({"step": step, "event": "non_finite_loss", "loss": None})
            self.progress.stop()
            raise StageFailed(
                f"training loss became {loss} at step {step}; stopped before the update "
                "(no checkpoint with non-finite weights was written)",
                hint="lower train.lr, raise train.warmup_steps, keep train.max_grad_norm > 0 "
                "or use precision fp32",
            )
        shared.last_step_loss = loss

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        shared = self.shared
        if shared.last_step_loss is not None:
            shared.step_losses.append(shared.last_step_loss)
        self.window_tokens += shared.tokens_acc
        shared.tokens_total += shared.tokens_acc
        shared.tokens_acc = 0
        every = self.spec.eval_every_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            control.should_evaluate = True
        if shared.ctx.stop_requested:
            shared.interrupted = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
        if control.should_save and not _weights_finite(kwargs["model"]):
            self.writer.write({"step": state.global_step, "event": "non_finite_weights"})
            self.progress.stop()
            raise StageFailed(
                f"model weights became non-finite at step {state.global_step}; "
                "no checkpoint was written",
                hint="lower train.lr or keep train.max_grad_norm > 0",
            )
        self.progress.advance(state.global_step, shared.last_step_loss)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        logs = dict(logs or {})
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        is_train_log = "loss" in logs
        for key, value in logs.items():
            if key in ("epoch", "total_flos") or key.startswith("train_"):
                continue
            record[rename_metric(key)] = value
        if is_train_log:
            now = time.perf_counter()
            elapsed = now - self.window_start - (self.shared.eval_seconds - self.window_eval_s)
            if elapsed > 0 and self.window_tokens:
                tokens_per_s = self.window_tokens / elapsed
                record["tokens_per_s"] = round(tokens_per_s, 1)
                if self.shared.flops_per_token and self.shared.peak_flops:
                    record["mfu"] = round(
                        tokens_per_s * self.shared.flops_per_token / self.shared.peak_flops, 4
                    )
            self.window_tokens = 0
            self.window_start = now
            self.window_eval_s = self.shared.eval_seconds
            self.progress.update_metrics(record)
        if len(record) > 2:
            self.writer.write(record)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        checkpoints_dir = Path(args.output_dir)
        checkpoint = checkpoints_dir / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            # Collators with their own randomness (MLM masking) key it on a batch counter; the
            # next batch to train is number `batches_consumed`, whatever the loader prefetched.
            # The last step's loss: a run resumed from its final checkpoint reports it as is.
            resume_state = {
                "batches_consumed": self.shared.batches_consumed,
                "last_step_loss": self.shared.last_step_loss,
            }
            (checkpoint / RESUME_STATE_FILE).write_text(json.dumps(resume_state), encoding="utf-8")
            ckpt.mark_complete(checkpoint, state.global_step)
            ckpt.rotate_checkpoints(
                checkpoints_dir, self.spec.keep_checkpoints, protected=self.shared.protected_steps
            )

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.progress.stop()


class NullWriter(JsonlWriter):
    """metrics.jsonl stand-in on ranks other than 0: keeps the records, writes nothing."""

    def __init__(self) -> None:
        self.previous = []
        self.history = []

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)


class DistributedCallback(MlstepsCallback):
    """Multi-process additions: one stop decision for all ranks, one checkpoint marker writer."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # A stop request seen by any rank stops every rank at the same step (else one rank would
        # save while another waits in the next step's all-reduce).
        ctx = self.shared.ctx
        flag = torch.tensor([1.0 if ctx.stop_requested else 0.0])
        if torch.cuda.is_available() and distributed.backend().startswith("cuda"):
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            ctx.stop_event.set()
        return super().on_step_end(args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Every rank has written its part (RNG state, shards) before rank 0 marks it COMPLETE.
        distributed.barrier()
        if distributed.is_main():
            super().on_save(args, state, control, **kwargs)
        distributed.barrier()


class MlstepsTrainerMixin:
    """Per-step loss capture (NaN guard), token counting and the extra evaluation hook."""

    _mlsteps: Shared

    def _get_train_sampler(self, train_dataset=None):  # type: ignore[no-untyped-def]
        sampler = super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        seed = self.args.data_seed  # type: ignore[attr-defined]
        # The plain shuffle, seeded: the same order without a per-epoch list (engine/sampler.py).
        if type(sampler) is torch.utils.data.RandomSampler and seed is not None:
            return PermutationSampler(len(sampler), int(seed))
        return sampler

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        shared = self._mlsteps
        # Accumulate on device; the single host sync happens once per optimizer step.
        detached = loss.detach().float()
        shared.loss_acc = detached if shared.loss_acc is None else shared.loss_acc + detached
        shared.tokens_acc += count_tokens(inputs)
        shared.batches_consumed += 1
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # type: ignore[no-untyped-def]
        if isinstance(eval_dataset, str):
            # The Trainer's own call for one set of a dict of validation sets (by name, from
            # inside the outer evaluate below): extra evaluation and keep_best run once, outside.
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # type: ignore[misc]
        shared = self._mlsteps
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        # Evaluation must not shift the training RNG stream (MLM masking, dropout), otherwise a
        # resumed run would diverge from an uninterrupted one depending on where evals fell.
        with torch.random.fork_rng():
            if eval_dataset is not None or getattr(self, "eval_dataset", None) is not None:
                metrics.update(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))  # type: ignore[misc]
            if shared.extra_eval is not None:
                model = self.model  # type: ignore[attr-defined]
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    extra = shared.extra_eval(model)
                model.train(was_training)
                self.log(dict(extra))  # type: ignore[attr-defined]
                metrics.update(extra)
        shared.eval_seconds += time.perf_counter() - started
        shared.last_eval_step = self.state.global_step  # type: ignore[attr-defined]
        shared.last_eval = {rename_metric(k): v for k, v in metrics.items()}
        if shared.after_eval is not None:
            shared.after_eval(self.state, self.control)  # type: ignore[attr-defined]
        return metrics


def read_resume_state(checkpoint: Path) -> dict[str, Any]:
    """What mlsteps stored next to a checkpoint (batches consumed, last step loss); {} if none."""
    state_file = checkpoint / RESUME_STATE_FILE
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text(encoding="utf-8"))
    return state if isinstance(state, dict) else {}


def restore_collator_state(checkpoint: Path, collator: Any) -> int:
    """Micro-batches trained before ``checkpoint``; sets ``collator.batch_serial`` to it."""
    consumed = int(read_resume_state(checkpoint).get("batches_consumed", 0))
    if hasattr(collator, "batch_serial"):
        collator.batch_serial = consumed
    return consumed


def _weights_finite(model: torch.nn.Module) -> bool:
    # One host sync for all parameters.
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()]
    return not flags or bool(torch.stack(flags).all())


_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(precision_16bit: bool) -> float | None:
    """Dense bf16 peak of known accelerators (MFU is only reported where this is known)."""
    if not (precision_16bit and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·layers·width·seq_len (attention).

    N counts every weight that takes part in a matmul: the input embedding is a lookup and is
    left out, unless it is tied to the output projection (then it is that matmul's weight).
    """
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not layers or not width:
        return None
    params = sum(p.numel() for p in model.parameters())  # shared tensors are yielded once
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    outputs = getattr(model, "get_output_embeddings", lambda: None)()
    in_weight = getattr(inputs, "weight", None)
    if in_weight is not None and in_weight is not getattr(outputs, "weight", None):
        params -= in_weight.numel()
    return float(6.0 * params + 12.0 * layers * width * seq_len)

"""The one Trainer wrapper shared by the pretrain, finetune and prompt stages.

``train(TrainRequest(...))`` turns a ``TrainSpec`` into ``TrainingArguments``, runs the transformers ``Trainer``
(or a subclass such as ``Seq2SeqTrainer``) and adds what every stage needs:

- metrics.jsonl: one JSON object per log (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``,
  ``tokens_per_s``, ``mfu``) and per evaluation (``val_*`` keys; the Trainer's ``eval_*`` names are
  renamed ``val_*``). Non-finite numbers are written as null.
- a rich progress bar on stderr (loss, lr, tokens/s, ETA), silent when ``ctx.quiet``;
- a NaN/inf guard: a non-finite training loss stops before that step's optimizer update with
  ``StageFailed``; weights are checked before every checkpoint so none with NaN is ever written;
- stop at a step boundary on ``ctx.stop_requested``: a complete checkpoint, then ``StageInterrupted``;
- complete checkpoints only (see ``engine.checkpoints``) and automatic resume from the newest one.

Resume reuses the Trainer's own mechanism (model, optimizer, scheduler, RNG states, data skip).
The Trainer loads optimizer/scheduler/scaler/RNG files with ``torch.load(weights_only=True)``
(transformers >= 4.5x, torch >= 2.6), so no arbitrary unpickling happens on resume; the pickled
``training_args.bin`` it writes is never read back.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.utils import logging as hf_logging

from mlsteps import distributed
from mlsteps.context import StageContext
from mlsteps.engine import best as best_ckpt
from mlsteps.engine import checkpoints as ckpt
from mlsteps.engine.progress import RichProgress
from mlsteps.engine.trackers import Trackers
from mlsteps.engine.train_args import build_training_args
from mlsteps.engine.train_callbacks import (
    DistributedCallback,
    ExtraEval,
    JsonlWriter,
    MlstepsCallback,
    MlstepsTrainerMixin,
    NullWriter,
    Shared,
    flops_per_token,
    peak_flops,
    read_resume_state,
    restore_collator_state,
)
from mlsteps.errors import StageFailed, StageInterrupted
from mlsteps.recipe.specs.train import TrainSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TrainOutcome:
    """What ``train`` returns once training finished normally."""

    metrics: dict[str, float]  # train_loss, val_* of the final evaluation, tokens_per_s, mfu, ...
    global_step: int
    log_history: list[dict[str, Any]]  # the records written to metrics.jsonl by this process
    resumed_from_step: int | None = None
    step_losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    initial_metrics: dict[str, float] = field(default_factory=dict)  # val_* before step 1
    # FSDP/DeepSpeed: the gathered full state dict, for save_final(state_dict=...) (None when
    # the model's own state dict is complete).
    full_state_dict: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainRequest:
    """Everything one training run needs, built once by the stage and handed to ``train``.

    - ``eval_dataset``: evaluated by the Trainer (``eval_loss`` -> ``val_loss``, plus
      ``compute_metrics``) every ``spec.eval_every_steps`` steps and once at the end.
    - ``extra_eval(model) -> {name: value}``: called at the same points (model in eval mode, no
      grad, training RNG untouched); use ``val_``-prefixed names. Its values win over the
      Trainer's on equal names (e.g. an exact token-weighted ``val_loss``).
    - ``trainer_cls``/``args_cls``/``args_overrides``/``trainer_kwargs``: e.g. ``Seq2SeqTrainer``,
      ``Seq2SeqTrainingArguments``, ``{"predict_with_generate": True}``,
      ``{"remove_unused_columns": False}``.
    - ``group_by_length``: overrides ``spec.group_by_length`` (packed blocks: pass False).
    - ``seq_len_for_mfu``: typical sequence length, for the attention term of MFU.
    - ``eval_at_start``: also evaluate before the first step (a fresh run only; a resumed run
      reads it back from metrics.jsonl) -> ``TrainOutcome.initial_metrics``.
    - Collators with an int attribute ``batch_serial`` get it restored on resume to the number
      of micro-batches already trained (see ``stages.pretrain.lm_data.MaskingCollator``).
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Any
    eval_dataset: Any | None
    data_collator: Any
    spec: TrainSpec
    ctx: StageContext
    compute_metrics: Callable[..., dict[str, float]] | None = None
    trainer_cls: type[Trainer] | None = None
    extra_eval: ExtraEval | None = None
    args_cls: type[TrainingArguments] = TrainingArguments
    args_overrides: dict[str, Any] | None = None
    trainer_kwargs: dict[str, Any] | None = None
    group_by_length: bool | None = None
    seq_len_for_mfu: int | None = None
    eval_at_start: bool = False


def train(request: TrainRequest) -> TrainOutcome:
    """Train ``request.model``, resuming from the newest complete checkpoint in
    ``ctx.checkpoints_dir``: ``build``, then ``fit``, then ``collect``.

    Raises ``StageFailed`` on a non-finite loss and ``StageInterrupted`` after writing a complete
    checkpoint when ``ctx.stop_requested`` is set. Does not write ``final/``: see ``save_final``.
    """
    run = build(request)
    run.trackers.attach(run.trainer)
    try:
        train_seconds = fit(run)
        outcome = collect(run, train_seconds)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, StageInterrupted) else "FAILED"
        run.trackers.finish(run.trainer, {}, status)
        raise
    run.trackers.finish(run.trainer, outcome.metrics)
    return outcome


@dataclass
class TrainingRun:
    """A Trainer wired with mlsteps' callbacks, ready to fit (what ``build`` returns)."""

    trainer: Any
    args: TrainingArguments
    shared: Shared  # what the callbacks and the trainer mixin share (losses, evals, tokens)
    writer: JsonlWriter
    progress: RichProgress
    trackers: Trackers
    resume: Path | None  # the newest complete checkpoint, resumed from
    best: best_ckpt.BestCallback | None
    ctx: StageContext
    eval_at_start: bool


def build(request: TrainRequest) -> TrainingRun:
    """Find the checkpoint to resume from and build the Trainer with mlsteps' callbacks."""
    spec, ctx, data_collator = request.spec, request.ctx, request.data_collator
    ctx.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    resume = ckpt.newest_complete_checkpoint(ctx.checkpoints_dir, log=ctx.log)
    resume_step = ckpt.checkpoint_step(resume) if resume is not None else None
    # (Incomplete or damaged directories newer than `resume` were removed by the search above, so
    # the Trainer never writes a new checkpoint into a half-written one.)
    consumed = 0
    if resume is not None:
        ctx.log(f"resuming from {resume.name}")
        consumed = restore_collator_state(resume, data_collator)

    trackers = Trackers(spec, ctx)
    overrides = {**trackers.training_args(), **(request.args_overrides or {})}
    args = build_training_args(
        spec,
        ctx,
        args_cls=request.args_cls,
        group_by_length=request.group_by_length,
        **overrides,
    )
    shared = Shared(ctx=ctx, extra_eval=request.extra_eval)
    best = None
    if spec.keep_best is not None or spec.early_stopping is not None:
        best = best_ckpt.BestCallback(spec, shared, resume)
        shared.after_eval = best.after_eval
    shared.batches_consumed = consumed
    # Only rank 0 writes metrics.jsonl (the logged loss is already averaged over ranks).
    writer = JsonlWriter(ctx.metrics_path, resume_step) if distributed.is_main() else NullWriter()
    progress = RichProgress(enabled=not ctx.quiet, label=ctx.stage)
    base = request.trainer_cls or Trainer
    trainer_type = type(f"Mlsteps{base.__name__}", (MlstepsTrainerMixin, base), {})
    trainer = trainer_type(
        model=request.model,
        args=args,
        train_dataset=request.train_dataset,
        eval_dataset=request.eval_dataset,
        data_collator=data_collator,
        processing_class=request.tokenizer,
        compute_metrics=request.compute_metrics,
        **(request.trainer_kwargs or {}),
    )
    trainer._mlsteps = shared
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    if best is not None:
        trainer.add_callback(best)  # before MlstepsCallback: its file goes into the manifest
    callback_cls = DistributedCallback if distributed.is_distributed() else MlstepsCallback
    trainer.add_callback(callback_cls(shared, writer, spec, progress))
    shared.peak_flops = peak_flops(args.bf16 or args.fp16)
    if request.seq_len_for_mfu:
        shared.flops_per_token = flops_per_token(request.model, request.seq_len_for_mfu)

    # Our progress bar replaces the hub/save tqdm bars ("Writing model shards").
    hf_logging.disable_progress_bar()
    return TrainingRun(
        trainer, args, shared, writer, progress, trackers, resume, best, ctx, request.eval_at_start
    )


def fit(run: TrainingRun) -> float:
    """Evaluate first if asked (``TrainRequest.eval_at_start``), train (or restore a finished run), evaluate last. Returns the
    seconds spent training, evaluation excluded."""
    trainer, args, shared, resume = run.trainer, run.args, run.shared, run.resume
    if run.eval_at_start and resume is None and _evaluates(run):
        trainer.evaluate()
    started = time.perf_counter()
    finished = resume is not None and (
        _training_complete(resume) or best_ckpt.stopped_early(resume)
    )
    try:
        if finished and resume is not None and not (args.fsdp or args.deepspeed):
            _restore_finished(trainer, resume, shared, run.writer, run.ctx)
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) refused an object: a tampered or foreign checkpoint.
        # Only name the offending object: torch's own text suggests weights_only=False, the
        # very thing that would run the untrusted code.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"unsupported global {found.group(1)}" if found else "not plain tensors/states"
        raise StageFailed(
            f"refusing to load {resume}: it contains objects that are not plain tensors/states "
            f"({what})",
            hint=f"delete {resume} to restart from the previous checkpoint",
        ) from exc
    finally:
        run.progress.stop()
    train_seconds = time.perf_counter() - started - shared.eval_seconds
    step = trainer.state.global_step
    if shared.interrupted:
        raise StageInterrupted(
            f"stopped at step {step}; resumable checkpoint {run.ctx.checkpoints_dir / f'checkpoint-{step}'}",
            hint="run the same command again to resume",
        )
    if shared.last_eval_step != step and _evaluates(run):
        trainer.evaluate()
    return train_seconds


def _evaluates(run: TrainingRun) -> bool:
    return run.trainer.eval_dataset is not None or run.shared.extra_eval is not None


def collect(run: TrainingRun, train_seconds: float) -> TrainOutcome:
    """The fitted run's numbers: steps, batch size, last train loss, throughput, last (or best)
    evaluation, the evaluation before step 1; the best checkpoint's weights are loaded."""
    trainer, args, shared, writer = run.trainer, run.args, run.shared, run.writer
    step = trainer.state.global_step
    if distributed.is_distributed():
        shared.tokens_total = int(distributed.all_sum(shared.tokens_total))
    # final/ is the best checkpoint's model when keep_best is set (its val_* describe it).
    best_metrics = run.best.load_best(trainer, step) if run.best is not None else {}
    full_state = None
    if distributed.is_distributed() and (args.fsdp or args.deepspeed):
        # A full state dict for final/ (a collective: every rank takes part, rank 0 keeps it).
        full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped)

    metrics: dict[str, float] = {"global_step": step}
    world = distributed.world_size()
    metrics["world_size"] = world
    metrics["global_batch_size"] = (
        args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    )
    # The last training log of the whole run, records from before a resume included.
    train_logs = [r for r in writer.previous + writer.history if r.get("loss") is not None]
    if train_logs:
        metrics["train_loss"] = train_logs[-1]["loss"]
    elif shared.step_losses:
        metrics["train_loss"] = shared.step_losses[-1]
    if train_seconds > 0 and shared.tokens_total:
        metrics["tokens_per_s"] = round(shared.tokens_total / train_seconds, 1)
        if shared.flops_per_token and shared.peak_flops:
            metrics["mfu"] = round(
                metrics["tokens_per_s"] * shared.flops_per_token / shared.peak_flops, 4
            )
    metrics.update(
        {
            k: v
            for k, v in shared.last_eval.items()
            if isinstance(v, (int, float)) and k != "epoch" and not k.endswith(_TIMING_SUFFIXES)
        }
    )
    metrics.update(best_metrics)
    initial = next(
        (
            r
            for r in writer.previous + writer.history
            if r.get("step") == 0 and any(k.startswith("val_") for k in r)
        ),
        {},
    )
    return TrainOutcome(
        initial_metrics={k: v for k, v in initial.items() if k.startswith("val_")},
        metrics=metrics,
        global_step=step,
        log_history=writer.history,
        resumed_from_step=ckpt.checkpoint_step(run.resume) if run.resume is not None else None,
        step_losses=shared.step_losses,
        full_state_dict=full_state,
    )


_TIMING_SUFFIXES = ("_runtime", "_per_second", "_preparation_time")


def _training_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the run's last step (killed after training, before final/)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return 0 < int(state["max_steps"]) <= int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _restore_finished(
    trainer: Any, checkpoint: Path, shared: Shared, writer: JsonlWriter, ctx: StageContext
) -> None:
    """Load a final-step checkpoint instead of training: the Trainer, resumed at max_steps,
    would run one step more than the uninterrupted run."""
    ctx.log(f"{checkpoint.name} is the last step: training was complete, loading it")
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    loss = read_resume_state(checkpoint).get("last_step_loss")
    if loss is not None:
        shared.step_losses.append(float(loss))
    # The final evaluation runs again after this (as after any training): its records at this
    # step go, so metrics.jsonl ends as the uninterrupted run's did, and generation-based
    # validation rewrites its predictions and conventions.
    writer.forget_evaluation_at(trainer.state.global_step)


def save_final(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    ctx: StageContext,
    *,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write model + tokenizer to ``ctx.final_dir`` atomically (``final.tmp/`` then rename).

    ``extra_files`` maps file names to text written next to the weights (e.g. a model card).
    ``state_dict``: the weights to write instead of the model's own (``TrainOutcome``'s
    ``full_state_dict`` of a sharded FSDP/DeepSpeed run).
    """
    if distributed.is_distributed():
        if distributed.is_main():
            _write_final(model, tokenizer, ctx, extra_files, state_dict)
        distributed.barrier()  # final/ exists for every rank once anyone reads it
        return ctx.final_dir
    return _write_final(model, tokenizer, ctx, extra_files, state_dict)


def _write_final(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    ctx: StageContext,
    extra_files: dict[str, str] | None,
    state_dict: dict[str, Any] | None,
) -> Path:
    def write(directory: Path) -> None:
        if state_dict is not None:
            model.save_pretrained(directory, state_dict=state_dict)
        else:
            model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text, encoding="utf-8")

    return ckpt.write_dir_atomically(ctx.final_dir, write)

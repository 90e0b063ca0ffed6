"""The one Trainer wrapper shared by the pretrain, finetune and prompt stages.

``train(...)`` turns a ``TrainSpec`` into ``TrainingArguments``, runs the transformers ``Trainer``
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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from mlsteps.engine.train_callbacks import (
    ExtraEval,
    JsonlWriter,
    MlstepsCallback,
    Shared,
    count_tokens,
    flops_per_token,
    peak_flops,
    read_resume_state,
    rename_metric,
    restore_collator_state,
)
from mlsteps.errors import StageFailed, StageInterrupted, UserError
from mlsteps.specs.common import TrainSpec


@dataclass
class TrainOutcome:
    """What ``train`` returns once training finished normally."""

    metrics: dict[str, float]  # train_loss, val_* of the final evaluation, tokens_per_s, mfu, ...
    global_step: int
    log_history: list[dict[str, Any]]  # the records written to metrics.jsonl by this process
    resumed_from_step: int | None = None
    step_losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    initial_metrics: dict[str, float] = field(default_factory=dict)  # val_* before step 1


class _MlstepsTrainerMixin:
    """Per-step loss capture (NaN guard), token counting and the extra evaluation hook."""

    _mlsteps: Shared

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


def _use_bf16(spec: TrainSpec) -> bool:
    if spec.precision == "bf16":
        return True
    return spec.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cpu_fused_adamw() -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError):
        return False
    return True


def build_training_args(
    spec: TrainSpec,
    ctx: StageContext,
    *,
    args_cls: type[TrainingArguments] = TrainingArguments,
    group_by_length: bool | None = None,
    **overrides: Any,
) -> TrainingArguments:
    """TrainingArguments from a TrainSpec; evaluation and saving cadence is driven by callbacks."""
    bf16 = _use_bf16(spec)
    if spec.precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "precision fp16 needs a CUDA GPU",
            where=f"stages.{ctx.stage}.train.precision",
            hint="use precision auto (bf16 where supported, else fp32)",
        )
    # torch has a fused AdamW for CUDA and (since 2.4) for CPU; on CPU it cut the optimizer step
    # of a 5M-parameter model from 88 to 17 ms (bench/pretrain.py).
    fused = spec.fused_adamw and (torch.cuda.is_available() or _cpu_fused_adamw())
    by_length = spec.group_by_length if group_by_length is None else group_by_length
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.checkpoints_dir),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum_steps,
        learning_rate=spec.lr,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(spec.schedule, spec.schedule),
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        bf16=bf16,
        fp16=spec.precision == "fp16",
        optim="adamw_torch_fused" if fused else "adamw_torch",
        torch_compile=spec.compile,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=ctx.seed,
        data_seed=ctx.seed,
        logging_strategy="steps",
        logging_steps=spec.log_every_steps,
        logging_nan_inf_filter=False,  # our guard fails loudly instead of hiding NaN steps
        eval_strategy="no",  # evaluation cadence comes from MlstepsCallback
        save_strategy="steps",
        save_steps=spec.save_every_steps,
        save_total_limit=None,  # rotation counts complete checkpoints only (on_save)
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=spec.dataloader_workers,
        train_sampling_strategy="group_by_length" if by_length else "random",
    )
    # transformers 5 renamed gradient_checkpointing (the old name warns); support both.
    fields = getattr(args_cls, "__dataclass_fields__", {})
    ckpt_key = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    kwargs[ckpt_key] = spec.gradient_checkpointing
    kwargs.update(_distributed_args())
    kwargs.update(overrides)
    return args_cls(**kwargs)


def train(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    data_collator: Any,
    spec: TrainSpec,
    ctx: StageContext,
    compute_metrics: Callable[..., dict[str, float]] | None = None,
    trainer_cls: type[Trainer] | None = None,
    extra_eval: ExtraEval | None = None,
    args_cls: type[TrainingArguments] = TrainingArguments,
    args_overrides: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    group_by_length: bool | None = None,
    seq_len_for_mfu: int | None = None,
    eval_at_start: bool = False,
) -> TrainOutcome:
    """Train ``model``, resuming from the newest complete checkpoint in ``ctx.checkpoints_dir``.

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
      of micro-batches already trained (see ``engine.lm_data.MaskingCollator``).

    Raises ``StageFailed`` on a non-finite loss and ``StageInterrupted`` after writing a complete
    checkpoint when ``ctx.stop_requested`` is set. Does not write ``final/``: see ``save_final``.
    """
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
    overrides = {**trackers.training_args(), **(args_overrides or {})}
    args = build_training_args(
        spec, ctx, args_cls=args_cls, group_by_length=group_by_length, **overrides
    )
    shared = Shared(ctx=ctx, extra_eval=extra_eval)
    best = None
    if spec.keep_best is not None or spec.early_stopping is not None:
        best = best_ckpt.BestCallback(spec, shared, resume)
        shared.after_eval = best.after_eval
    shared.batches_consumed = consumed
    # Only rank 0 writes metrics.jsonl (the logged loss is already averaged over ranks).
    writer = JsonlWriter(ctx.metrics_path, resume_step) if distributed.is_main() else _NullWriter()
    progress = RichProgress(enabled=not ctx.quiet, label=ctx.stage)
    base = trainer_cls or Trainer
    trainer_type = type(f"Mlsteps{base.__name__}", (_MlstepsTrainerMixin, base), {})
    trainer = trainer_type(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        **(trainer_kwargs or {}),
    )
    trainer._mlsteps = shared
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    if best is not None:
        trainer.add_callback(best)  # before MlstepsCallback: its file goes into the manifest
    callback_cls = _DistributedCallback if distributed.is_distributed() else MlstepsCallback
    trainer.add_callback(callback_cls(shared, writer, spec, progress))
    shared.peak_flops = peak_flops(args.bf16 or args.fp16)
    if seq_len_for_mfu:
        shared.flops_per_token = flops_per_token(model, seq_len_for_mfu)

    # Our progress bar replaces the hub/save tqdm bars ("Writing model shards").
    hf_logging.disable_progress_bar()
    trackers.attach(trainer)
    try:
        outcome = _run(trainer, args, shared, writer, progress, resume, best, ctx, eval_at_start)
    except BaseException as exc:
        trackers.finish(trainer, {}, "KILLED" if isinstance(exc, StageInterrupted) else "FAILED")
        raise
    trackers.finish(trainer, outcome.metrics)
    return outcome


def _run(
    trainer: Any,
    args: TrainingArguments,
    shared: Shared,
    writer: JsonlWriter,
    progress: RichProgress,
    resume: Path | None,
    best: best_ckpt.BestCallback | None,
    ctx: StageContext,
    eval_at_start: bool,
) -> TrainOutcome:
    """Evaluate first if asked, train or restore a finished run, evaluate last, collect."""
    resume_step = ckpt.checkpoint_step(resume) if resume is not None else None
    evaluates = trainer.eval_dataset is not None or shared.extra_eval is not None
    if eval_at_start and resume is None and evaluates:
        trainer.evaluate()
    started = time.perf_counter()
    finished = resume is not None and (
        _training_complete(resume) or best_ckpt.stopped_early(resume)
    )
    try:
        if finished and resume is not None and not (args.fsdp or args.deepspeed):
            _restore_finished(trainer, resume, shared, writer, ctx)
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
        progress.stop()
    train_seconds = time.perf_counter() - started - shared.eval_seconds
    step = trainer.state.global_step
    if shared.interrupted:
        raise StageInterrupted(
            f"stopped at step {step}; resumable checkpoint {ctx.checkpoints_dir / f'checkpoint-{step}'}",
            hint="run the same command again to resume",
        )
    if shared.last_eval_step != step and evaluates:
        trainer.evaluate()
    if distributed.is_distributed():
        shared.tokens_total = int(distributed.all_sum(shared.tokens_total))
    # final/ is the best checkpoint's model when keep_best is set (its val_* describe it).
    best_metrics = best.load_best(trainer, step) if best is not None else {}
    if distributed.is_distributed() and (args.fsdp or args.deepspeed):
        # A full state dict for final/ (a collective: every rank takes part, rank 0 keeps it).
        _FULL_STATE[trainer.model] = trainer.accelerator.get_state_dict(trainer.model_wrapped)

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
        resumed_from_step=resume_step,
        step_losses=shared.step_losses,
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
    model: Any, tokenizer: Any, ctx: StageContext, *, extra_files: dict[str, str] | None = None
) -> Path:
    """Write model + tokenizer to ``ctx.final_dir`` atomically (``final.tmp/`` then rename).

    ``extra_files`` maps file names to text written next to the weights (e.g. a model card).
    """

    state_dict = _FULL_STATE.pop(model, None)
    if distributed.is_distributed():
        if distributed.is_main():
            _write_final(model, tokenizer, ctx, extra_files, state_dict)
        distributed.barrier()  # final/ exists for every rank once anyone reads it
        return ctx.final_dir
    return _write_final(model, tokenizer, ctx, extra_files, state_dict)


def _write_final(
    model: Any,
    tokenizer: Any,
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


# Full (gathered) state dicts of FSDP/DeepSpeed-trained models, kept by ``train`` for save_final.
_FULL_STATE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _distributed_args() -> dict[str, Any]:
    """TrainingArguments for a multi-process run: backend, timeout, FSDP or DeepSpeed."""
    if not distributed.is_distributed():
        return {}
    conf = distributed.settings()
    out: dict[str, Any] = {
        "ddp_backend": "nccl" if torch.cuda.is_available() and conf.backend != "gloo" else "gloo",
        "ddp_timeout": conf.timeout_s,
        "ddp_find_unused_parameters": conf.find_unused_parameters,
        # accelerate only sets up multi-process CPU training (gloo DDP) when told it is on CPU.
        "use_cpu": not torch.cuda.is_available(),
    }
    if (conf.fsdp is not None or conf.deepspeed is not None) and not torch.cuda.is_available():
        # accelerate only shards on accelerators; on CPU it would silently fall back to DDP.
        engine = "fsdp" if conf.fsdp is not None else "deepspeed"
        raise UserError(
            f"{engine} sharding needs CUDA GPUs; this process has none",
            where=f"distributed.{engine}",
            hint="remove the block to train with plain data parallelism (DDP) on CPU",
        )
    if conf.fsdp is not None:
        out["fsdp"] = True
        out["fsdp_config"] = conf.fsdp.trainer_config()
    if conf.deepspeed is not None:
        out["deepspeed"] = conf.deepspeed.trainer_config()
    return out


class _NullWriter(JsonlWriter):
    """metrics.jsonl stand-in on ranks other than 0: keeps the records, writes nothing."""

    def __init__(self) -> None:
        self.previous = []
        self.history = []

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)


class _DistributedCallback(MlstepsCallback):
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

"""engine.training: stop at a step boundary + resume == uninterrupted; complete checkpoints only;
damaged checkpoints skipped; the NaN guard never lets non-finite weights reach disk.

Runs the real pretrain stage on tiny models (2 layers, width 32) and a real corpus slice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsteps.context import StageContext
from mlsteps.engine import checkpoints as ckpt
from mlsteps.errors import StageFailed, StageInterrupted
from mlsteps.recipe.specs.pretrain import PretrainSpec
from mlsteps.recipe.specs.tokenizer import TokenizerSpec
from mlsteps.stages import pretrain, tokenizer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"


@dataclass
class StopAtStep(StageContext):
    """A context whose stop signal fires at the k-th step boundary, like SIGINT arriving then.

    The training callback asks ``stop_requested`` once per optimizer step; the runner's signal
    handler would set the same event.
    """

    stop_at: int = 0
    checks: int = 0

    @property
    def stop_requested(self) -> bool:
        self.checks += 1
        if self.stop_at and self.checks >= self.stop_at:
            self.stop_event.set()
        return self.stop_event.is_set()


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    dirs = {}
    for target in ("clm", "mlm"):
        ctx = StageContext(
            run_dir=root, stage=f"tok_{target}", kind="tokenizer", seed=0, quiet=True
        )
        spec = TokenizerSpec.model_validate(
            {
                "kind": "tokenizer",
                "data": {"files": [str(DATA)], "max_samples": 300},
                "vocab_size": 300,
                "target": target,
            }  # fmt: skip
        )
        tokenizer.run(spec, ctx)
        dirs[target] = ctx.final_dir
    return dirs


def _spec(objective: str, **train: object) -> PretrainSpec:
    family = "gpt2" if objective == "clm" else "bert"
    return PretrainSpec.model_validate(
        {
            "kind": "pretrain",
            "objective": objective,
            "tokenizer": "tok",
            "model": {"family": family, "n_layers": 2, "hidden_size": 32, "n_heads": 2,
                      "max_positions": 64, "dropout": 0.1},
            # 9 lines -> a block count that is not a multiple of the batch size (checked below)
            "data": {"files": [str(DATA)], "max_samples": 9},
            "validation_fraction": 0.2,
            "max_seq_len": 32,
            "train": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every_steps": 1,
                      "save_every_steps": 3, "keep_checkpoints": 2, "max_steps": 14, **train},
        }
    )  # fmt: skip


def _ctx(run_dir: Path, tok: Path, stop_at: int = 0) -> StopAtStep:
    return StopAtStep(
        run_dir=run_dir, stage="pretrain", kind="pretrain", seed=0, quiet=True,
        upstream={"tok": tok}, stop_at=stop_at,
    )  # fmt: skip


def _step_losses(ctx: StageContext) -> dict[int, float]:
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    steps = [s for s, _ in losses]
    assert len(steps) == len(set(steps)), "every step is logged exactly once, also after resume"
    return dict(losses)


def _weights(ctx: StageContext) -> dict[str, torch.Tensor]:
    return load_file(str(ctx.final_dir / "model.safetensors"))


def _assert_same_run(a: StageContext, b: StageContext, steps: int) -> None:
    la, lb = _step_losses(a), _step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: one intra-op thread is 5x faster than two that
    # wait on each other, and reductions run in one fixed order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = {
    # (objective, grad_accum, batch_size, max_steps)
    "clm": ("clm", 1, 4, 14),  # 41 blocks: 11 batches per epoch, the last one partial
    "mlm": ("mlm", 2, 5, 10),  # MLM masks must be redrawn identically; grad accumulation
}


def _case_spec(case: str, **train: object) -> PretrainSpec:
    objective, grad_accum, batch_size, steps = CASES[case]
    return _spec(
        objective, grad_accum_steps=grad_accum, batch_size=batch_size, max_steps=steps, **train
    )


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory, tok_dirs: dict[str, Path]
) -> dict[str, tuple[StageContext, dict]]:
    """One uninterrupted run per case, shared by the resume tests."""
    runs = {}
    for case, (objective, *_rest) in CASES.items():
        ctx = _ctx(tmp_path_factory.mktemp(f"full_{case}"), tok_dirs[objective])
        runs[case] = (ctx, pretrain.run(_case_spec(case), ctx).metrics)
    return runs


@pytest.mark.parametrize(("case", "stop_at"), [("clm", 13), ("mlm", 7)])  # both in epoch 2
def test_stop_and_resume_equals_uninterrupted(
    tmp_path: Path, tok_dirs: dict[str, Path], references: dict, case: str, stop_at: int
) -> None:
    spec = _case_spec(case)
    steps, per_step = spec.train.max_steps, spec.train.batch_size * spec.train.grad_accum_steps
    assert steps is not None
    full, result = references[case]
    blocks = result["train_blocks"]
    assert blocks % spec.train.batch_size != 0, "premise: a partial last batch in every epoch"
    assert blocks < stop_at * per_step < steps * per_step, "premise: the stop is in epoch 2"

    part = _ctx(tmp_path, tok_dirs[spec.objective], stop_at=stop_at)
    with pytest.raises(StageInterrupted, match=f"step {stop_at}"):
        pretrain.run(spec, part)
    assert not part.final_dir.exists()
    newest = ckpt.list_checkpoints(part.checkpoints_dir)[-1]
    assert newest.name == f"checkpoint-{stop_at}" and ckpt.checkpoint_problem(newest) is None

    resumed = _ctx(tmp_path, tok_dirs[spec.objective])
    again = pretrain.run(spec, resumed)
    _assert_same_run(full, resumed, steps)
    assert again.metrics["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    # The pre-training perplexity survives the interruption (read back from metrics.jsonl).
    assert again.metrics["initial_val_perplexity"] == result["initial_val_perplexity"]


def test_resume_from_the_last_step_trains_no_further(
    tmp_path: Path, tok_dirs: dict[str, Path], references: dict
) -> None:
    """Stopped at the last step (checkpoint written, final/ not yet): the rerun loads that
    checkpoint instead of training. The Trainer alone would run one step more (15 of 14)."""
    spec = _case_spec("clm")
    steps = spec.train.max_steps
    assert steps is not None
    full, result = references["clm"]
    with pytest.raises(StageInterrupted, match=f"step {steps}"):
        pretrain.run(spec, _ctx(tmp_path, tok_dirs["clm"], stop_at=steps))
    resumed = _ctx(tmp_path, tok_dirs["clm"])
    again = pretrain.run(spec, resumed).metrics
    assert again["global_step"] == steps
    _assert_same_run(full, resumed, steps)
    for key in ("train_loss", "val_loss", "val_perplexity", "initial_val_perplexity"):
        assert again[key] == pytest.approx(result[key], abs=1e-6), key
    # The final evaluation is logged once, as in the uninterrupted run.
    records = [json.loads(line) for line in resumed.metrics_path.read_text().splitlines()]
    assert sum(1 for r in records if r["step"] == steps and "val_loss" in r) == 1


def test_damaged_and_incomplete_checkpoints_are_skipped(
    tmp_path: Path, tok_dirs: dict[str, Path], references: dict
) -> None:
    # Another checkpoint cadence than the reference: saving must not change the trajectory.
    spec = _case_spec("clm", save_every_steps=2, keep_checkpoints=3)
    part = _ctx(tmp_path, tok_dirs["clm"], stop_at=7)
    with pytest.raises(StageInterrupted):
        pretrain.run(spec, part)
    names = [c.name for c in ckpt.list_checkpoints(part.checkpoints_dir)]
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-7"]  # newest 3 complete kept
    # checkpoint-7: weights truncated (disk full); checkpoint-6: the marker never got written.
    weights = part.checkpoints_dir / "checkpoint-7" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (part.checkpoints_dir / "checkpoint-6" / ckpt.COMPLETE_MARKER).unlink()
    assert "expected" in (ckpt.checkpoint_problem(weights.parent) or "")

    logged: list[str] = []
    resumed = _ctx(tmp_path, tok_dirs["clm"])
    resumed.quiet = False
    resumed.log = logged.append  # type: ignore[method-assign]
    pretrain.run(spec, resumed)
    assert "resuming from checkpoint-4" in logged
    assert any("checkpoint-7" in m and "ignoring" in m for m in logged)
    assert not (part.checkpoints_dir / "checkpoint-6").exists()
    _assert_same_run(references["clm"][0], resumed, 14)


def test_safetensors_validation(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(path))
    assert ckpt.safetensors_intact(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert not ckpt.safetensors_intact(path)
    path.write_bytes(data + b"\0")
    assert not ckpt.safetensors_intact(path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    assert not ckpt.safetensors_intact(path)


def test_non_finite_loss_stops_without_writing_bad_weights(
    tmp_path: Path, tok_dirs: dict[str, Path]
) -> None:
    # An absurd learning rate without clipping makes the weights and then the loss blow up.
    spec = _spec("clm", lr=1e6, max_grad_norm=0, warmup_steps=0, save_every_steps=1, max_steps=30)
    ctx = _ctx(tmp_path, tok_dirs["clm"])
    with pytest.raises(StageFailed, match="non-finite|became"):
        pretrain.run(spec, ctx)
    records = [json.loads(line) for line in ctx.metrics_path.read_text().splitlines()]
    assert any(r.get("event") in ("non_finite_loss", "non_finite_weights") for r in records)
    assert not ctx.final_dir.exists()
    for checkpoint in ckpt.list_checkpoints(ctx.checkpoints_dir):
        for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)
    # metrics.jsonl is strict JSON: non-finite numbers are written as null.
    assert all(
        v is None or not isinstance(v, float) or math.isfinite(v)
        for r in records
        for v in r.values()
    )


class _Evil:
    """Unpickling this would create a file: a checkpoint planted by someone else."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_tampered_rng_state_is_never_unpickled(tmp_path: Path, tok_dirs: dict[str, Path]) -> None:
    spec = _spec("clm", max_steps=6)
    part = _ctx(tmp_path, tok_dirs["clm"], stop_at=4)
    with pytest.raises(StageInterrupted):
        pretrain.run(spec, part)
    checkpoint = part.checkpoints_dir / "checkpoint-4"
    sentinel = tmp_path / "pwned"
    torch.save(_Evil(sentinel), checkpoint / "rng_state.pth")
    # Keep the manifest consistent so the checkpoint still counts as complete.
    manifest = json.loads((checkpoint / ckpt.COMPLETE_MARKER).read_text())
    manifest["files"]["rng_state.pth"] = (checkpoint / "rng_state.pth").stat().st_size
    manifest["sha256"]["rng_state.pth"] = ckpt.file_sha256(checkpoint / "rng_state.pth")
    (checkpoint / ckpt.COMPLETE_MARKER).write_text(json.dumps(manifest))
    with pytest.raises(StageFailed, match="refusing to load"):
        pretrain.run(spec, _ctx(tmp_path, tok_dirs["clm"]))
    assert not sentinel.exists()

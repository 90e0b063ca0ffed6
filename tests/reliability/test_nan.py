"""NaN/inf injection: the stage stops within one step with exit 1 and one clear line, no
non-finite weights are ever saved (every checkpoint and final/ is finite or absent),
metrics.jsonl records what happened, earlier stages are untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from relkit import (
    MINI,
    all_finite,
    cli,
    copy_run,
    read_json,
    read_jsonl,
    safetensors_files,
    tree_hashes,
)

RUN_FILES = ("state.json", "metrics.json", "report.md", "env.json", "recipe.yaml")


def _earlier(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in tree_hashes(run_dir).items() if k.startswith(("tok/", "pre/"))}


def _check_failed_stage(res, run_dir: Path, stage: str) -> int:  # type: ignore[no-untyped-def]
    """Common checks; returns the step the non-finite loss was detected at."""
    assert res.code == 1, res.err[-3000:]
    assert "Traceback" not in res.err
    assert len(res.error_lines) == 1 and res.err_lines[-1] == res.error_lines[0]
    line = res.error_lines[0]
    assert "non-finite" in line or "nan" in line.lower() or "inf" in line, line
    assert "lower train.lr" in line, line
    assert len(line) < 400
    state = read_json(run_dir / "state.json")["stages"][stage]
    assert state["status"] == "failed" and state["error"] in line
    assert not (run_dir / stage / "final").exists()
    for path in safetensors_files(run_dir / stage):
        assert all_finite(path), f"non-finite weights saved in {path}"
    records = read_jsonl(run_dir / stage / "metrics.jsonl")
    events = [r for r in records if r.get("event") == "non_finite_loss"]
    assert len(events) == 1, records[-5:]
    bad_step = events[0]["step"]
    for record in records:
        for key, value in record.items():
            assert not (isinstance(value, float) and not math.isfinite(value)), (key, record)
    # Stopped within one step: nothing was logged or saved after the bad step.
    assert max(r["step"] for r in records) == bad_step
    for ckpt in (run_dir / stage / "checkpoints").glob("checkpoint-*"):
        assert int(ckpt.name.split("-")[1]) < bad_step, (
            f"{ckpt.name} written at/after step {bad_step}"
        )
    assert stage not in read_json(run_dir / "metrics.json")
    return bad_step


@pytest.mark.parametrize("lr", ["1.0e+6", pytest.param("1.0e+30", marks=pytest.mark.slow)])
def test_huge_learning_rate_stops_the_stage(lr: str, tmp_path: Path, mini_run: Path) -> None:
    run_dir = copy_run(mini_run, tmp_path / "run")
    earlier = _earlier(run_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        MINI + "  boom:\n    kind: pretrain\n    from: pre\n"
        "    data: {builtin: toy/corpus, max_samples: 120}\n    validation_fraction: 0\n"
        f"    max_seq_len: 32\n    train: {{max_steps: 30, lr: {lr}, max_grad_norm: 0, save_every_steps: 1}}\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    _check_failed_stage(res, run_dir, "boom")
    assert _earlier(run_dir) == earlier


def test_inf_loss_in_one_batch_stops_before_the_update(
    tmp_path: Path, mini_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inf in the loss of step 3 (as a corrupt batch would give): checkpoint-2 stays the
    newest, step 3 is never applied or saved."""
    import torch
    from transformers import Trainer

    original = Trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(self, model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, model, inputs, *args, **kwargs)
        calls["n"] += 1
        if self.model.training and self.state.global_step == 2:
            if isinstance(out, tuple):
                return (out[0] * torch.tensor(float("inf")), *out[1:])
            return out * torch.tensor(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    run_dir = copy_run(mini_run, tmp_path / "run")
    earlier = _earlier(run_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        MINI + "  boom:\n    kind: pretrain\n    from: pre\n"
        "    data: {builtin: toy/corpus, max_samples: 120}\n    validation_fraction: 0\n"
        "    max_seq_len: 32\n    train: {max_steps: 6, save_every_steps: 1}\n"
    )
    res = cli("run", recipe, "--run-dir", run_dir)
    assert calls["n"] >= 3
    assert _check_failed_stage(res, run_dir, "boom") == 3
    ckpts = sorted(p.name for p in (run_dir / "boom" / "checkpoints").glob("checkpoint-*"))
    assert ckpts and ckpts[-1] == "checkpoint-2", ckpts
    assert _earlier(run_dir) == earlier

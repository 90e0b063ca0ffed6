"""The preference stage under torchrun: 2 CPU processes (gloo) reproduce 1 process, and only
rank 0 writes.

An SFT model is trained once (tokenizer -> finetune, one process). A DPO recipe `from:` that
model then runs twice: in this process with batch 4, and through the real launcher
(``mlsteps run --nproc-per-node 2``) with batch 2 on each rank: the same global batches, so the
same losses, rewards and final weights (up to float32 all-reduce order). Kill -9 and exact resume
of the preference stage are in tests/integration/test_preference.py
(``test_kill9_during_dpo_then_rerun_equals_uninterrupted``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from relkit import cli, read_json  # noqa: E402

SFT = """\
name: sft
seed: 3
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/translate, max_samples: 600}
    text_column: [source, target]
    vocab_size: 300
  sft:
    kind: finetune
    task: causal_lm
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 128}
    tokenizer: tok
    data: {builtin: toy/translate, max_samples: 200}
    validation_fraction: 0
    template: "English: {source}\\nToy: "
    response_column: target
    max_seq_len: 64
    train: {max_steps: 10, batch_size: 16, lr: 3.0e-3, precision: fp32}
"""

DPO = """\
name: dpo
seed: 3
stages:
  dpo:
    kind: preference
    method: dpo
    from: SFT_FINAL
    data: {builtin: toy/preference, max_samples: 16}
    validation: {builtin: toy/preference, split: validation, max_samples: 4}
    max_seq_len: 128
    beta: 0.5
    train: {max_steps: 4, batch_size: 4, lr: 2.0e-3, log_every_steps: 1, save_every_steps: 2,
            eval_every_steps: 2, precision: fp32, warmup_steps: 0, fused_adamw: false}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pref_dist")
    (root / "sft.yaml").write_text(SFT, encoding="utf-8")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = cli("run", root / "sft.yaml", "--run-dir", root / "sft")
        assert res.code == 0, res.err[-3000:]
        (root / "dpo.yaml").write_text(
            DPO.replace("SFT_FINAL", str(root / "sft" / "sft" / "final")), encoding="utf-8"
        )
        res = cli("run", root / "dpo.yaml", "--run-dir", root / "one")
        assert res.code == 0, res.err[-3000:]
    finally:
        torch.set_num_threads(before)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlsteps", "run", str(root / "dpo.yaml"),
         "--run-dir", str(root / "two"), "--nproc-per-node", "2",
         "stages.dpo.train.batch_size=2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "two.err").write_text(proc.stderr)
    return root


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_ranks_reproduce_one_process(runs: Path) -> None:
    from safetensors.torch import load_file

    one, two = runs / "one" / "dpo", runs / "two" / "dpo"
    m1, m2 = (
        read_json(runs / "one" / "metrics.json")["dpo"],
        read_json(runs / "two" / "metrics.json")["dpo"],
    )
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["global_batch_size"] == m2["global_batch_size"] == 4
    for key in ("train_loss", "val_loss", "val_reward_accuracy", "val_reward_margin"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    curve1 = {r["step"]: r for r in _records(one / "metrics.jsonl") if "loss" in r}
    curve2 = {r["step"]: r for r in _records(two / "metrics.jsonl") if "loss" in r}
    assert sorted(curve1) == sorted(curve2) == [1, 2, 3, 4]
    for step, rec in curve1.items():
        for key in ("loss", "grad_norm", "reward_margin", "reward_accuracy"):
            assert curve2[step][key] == pytest.approx(rec[key], abs=1e-5), (step, key)
    # The same final files, loadable as they are, with the same weights.
    assert _files(one / "final") == _files(two / "final")
    w1 = load_file(str(one / "final" / "model.safetensors"))
    w2 = load_file(str(two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    # Weights: float32 all-reduce adds the two half-batches in another order than one process
    # (last-bit differences). Adam divides by sqrt(v) + 1e-8, so a parameter whose gradient is
    # zero up to rounding (attention key biases: softmax ignores them; position rows that one
    # long answer reaches) moves by noise of the order of lr in both runs, differently. All but
    # a handful of the 39k weights agree to 1e-5 (5 when written); those few stay under lr/2.
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    off = int((diffs > 1e-5).sum())
    assert off <= 1e-3 * diffs.numel(), (off, diffs.numel())
    assert float(diffs.max()) < 1e-3, float(diffs.max())  # lr is 2e-3
    for name in ("tokenizer.json", "config.json", "mlsteps_prompt.json"):
        assert (one / "final" / name).read_bytes() == (two / "final" / name).read_bytes(), name


@pytest.mark.slow
def test_only_rank_zero_writes(runs: Path) -> None:
    run2 = runs / "two"
    state = read_json(run2 / "state.json")
    assert state["stages"]["dpo"]["status"] == "done"
    records = _records(run2 / "dpo" / "metrics.jsonl")
    keys = [(r["step"], tuple(sorted(r))) for r in records]
    assert len(keys) == len(set(keys)), "each record once: rank 1 wrote none"
    assert [r["step"] for r in records if "val_reward_accuracy" in r] == [0, 2, 4]
    # Complete checkpoints only, nothing half-written or duplicated by a second writer.
    assert not list(run2.glob("**/*.tmp")) and not list(run2.glob("**/.*.next"))
    checkpoints = sorted(p.name for p in (run2 / "dpo" / "checkpoints").glob("checkpoint-*"))
    one = sorted(p.name for p in (runs / "one" / "dpo" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == one and checkpoints
    listing = {c: _files(run2 / "dpo" / "checkpoints" / c) for c in checkpoints}
    assert all("COMPLETE" in files for files in listing.values()), listing
    assert (run2 / "dpo" / "rewards.png").is_file() and (run2 / "report.md").is_file()
    err = (runs / "two.err").read_text()
    assert err.count("[dpo] dpo/full:") == 1, "stage logs come from rank 0 only"

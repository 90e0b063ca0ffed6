"""Helpers of the reliability suite: the tiny pipeline, CLI runners, fault points, hashes.

Every test here proves that a fault loses nothing. The pipeline below runs every stage kind on
tiny models (2 layers, width 32) and builtin data in seconds on a CPU, with a checkpoint every
two steps so that kills land between, inside and during checkpoint writes.

Two ways to run the CLI:

- ``cli(...)``: in this process (``mlsteps.cli.main``), for the many bad-input cases (no torch
  import per case) and for reruns after a kill (the same command, the same code path);
- ``spawn(...)``: ``python -m mlsteps ...`` in a subprocess, for everything that gets killed or
  signalled. ``fault=`` pauses that process at an exact moment (see faultinject/sitecustomize.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
FAULT_DIR = HERE / "faultinject"

# Fixed thread count: CPU kernels then reduce in the same order in every process, so metrics of
# an interrupted-and-resumed run can be compared with an uninterrupted one for equality.
THREADS = "1"

# The tiny pipeline: every stage kind, checkpoints every 2 steps, log every step.
PIPELINE = """\
name: rel
seed: 7
defaults:
  train: {batch_size: 4, log_every_steps: 1, save_every_steps: 2, keep_checkpoints: 2,
          precision: fp32, lr: 1.0e-3, warmup_steps: 0}
stages:
  tok:
    kind: tokenizer
    data: {builtin: toy/corpus, max_samples: 300}
    vocab_size: 300
    min_frequency: 2
  pre:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 32, n_heads: 2, max_positions: 256}
    data: {builtin: toy/corpus, max_samples: 120}
    validation_fraction: 0.1
    max_seq_len: 32
    train: {max_steps: 8}
  sft:
    kind: finetune
    task: causal_lm
    from: pre
    data: {builtin: toy/translate, max_samples: 48}
    validation_fraction: 0.1
    prompt_column: source
    response_column: target
    max_seq_len: 64
    validation_max_samples: 3
    generation: {max_new_tokens: 4}
    train: {max_steps: 6}
  soft:
    kind: prompt
    method: prompt_tuning
    from: pre
    data: {builtin: toy/translate, max_samples: 48}
    template: "{source} ="
    num_virtual_tokens: 4
    max_seq_len: 64
    preview_rows: 2
    train: {max_steps: 6, lr: 3.0e-2}
  ev:
    kind: eval
    models: [pre, sft]
    data: {builtin: toy/translate, split: test, max_samples: 6}
    metrics: [chrf, exact_match]
    generation: {max_new_tokens: 4}
  ppl:
    kind: eval
    models: [pre]
    data: {builtin: toy/corpus, split: test, max_samples: 8}
    metrics: [perplexity]
  pred:
    kind: predict
    model: sft
    data: {builtin: toy/translate, split: test, max_samples: 6}
    reference_column: target
    generation: {max_new_tokens: 4}
"""

# The first two stages alone: the base that bad-input stages are appended to.
MINI = PIPELINE[: PIPELINE.index("  sft:\n")]
MINI_STAGES = ("tok", "pre")
TRAINING_STAGES = ("pre", "sft", "soft")
# Metric keys that measure speed, not results: excluded when runs are compared for equality.
TIMING_KEYS = ("tokens_per_s", "mfu", "duration_s", "seconds", "_runtime", "_per_second")


def is_timing(key: str) -> bool:
    return any(part in key for part in TIMING_KEYS)


def comparable(value: Any) -> Any:
    """metrics.json without timing/throughput fields (recursively)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not is_timing(k)}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def loss_curve(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training log line of a metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_jsonl(path) if r.get("loss") is not None]


def tree_hashes(root: Path, *, skip: tuple[str, ...] = (".lock",)) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not path.is_symlink() and path.name not in skip:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err_lines if line.startswith("error:")]


def cli(*args: str | os.PathLike[str], cwd: Path | None = None) -> Result:
    """Run ``mlsteps ARGS`` in this process; returns the exit code and captured output."""
    from mlsteps.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=THREADS,
        MKL_NUM_THREADS=THREADS,
        PYTHONPATH=os.pathsep.join([str(FAULT_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


class Proc:
    """A ``python -m mlsteps`` subprocess, optionally paused at a fault point."""

    def __init__(self, args: list[str], cwd: Path, fault: str | None, tag: str):
        self.flag = cwd / f".fault-{tag}.paused"
        self.cont = cwd / f".fault-{tag}.continue"
        for f in (self.flag, self.cont):
            f.unlink(missing_ok=True)
        extra = {}
        if fault:
            extra = {
                "MLSTEPS_FAULT_AT": fault,
                "MLSTEPS_FAULT_FLAG": str(self.flag),
                "MLSTEPS_FAULT_CONTINUE": str(self.cont),
            }
        self.errfile = open(cwd / f".proc-{tag}.stderr", "w+")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [str(PYTHON), "-m", "mlsteps", *args],
            cwd=cwd,
            env=subprocess_env(**extra),
            stdout=subprocess.PIPE,
            stderr=self.errfile,
            text=True,
        )

    def wait_paused(self, timeout: float = 300) -> str:
        """Block until the fault point is reached; returns what the process wrote there."""
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before the fault point:\n"
                    + self.stderr()[-3000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("fault point not reached in time:\n" + self.stderr()[-3000:])
            time.sleep(0.02)
        return self.flag.read_text()

    def wait_for(self, predicate, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before the moment:\n"
                    + self.stderr()[-3000:]
                )
            assert time.monotonic() < deadline, "moment not reached:\n" + self.stderr()[-3000:]
            time.sleep(0.01)

    def resume(self) -> None:
        self.cont.write_text("go")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=60)

    def finish(self, timeout: float = 600) -> Result:
        out, _ = self.popen.communicate(timeout=timeout)
        return Result(self.popen.returncode, out or "", self.stderr())

    def stderr(self) -> str:
        self.errfile.flush()
        self.errfile.seek(0)
        return self.errfile.read()


def spawn(
    args: list[str | os.PathLike[str]], cwd: Path, *, fault: str | None = None, tag: str = "p"
) -> Proc:
    return Proc([str(a) for a in args], cwd, fault, tag)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def safetensors_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def all_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def no_nan_numbers(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(no_nan_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nan_numbers(v) for v in value)
    return True

"""The CPU side of bench/gpu_check.sh (issue 19): arguments, result parsing, curve comparison,
MFU, and the skips on a machine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_arguments() -> None:
    args = gpu_check.parse_args([])
    assert args.sections == list(gpu_check.SECTIONS) and args.steps == 60
    assert gpu_check.parse_args(["--only", "peak, qlora"]).sections == ["peak", "qlora"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "peak,warp"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "3"])


def test_results_round_trip_and_survive_noise() -> None:
    text = "\n".join(
        [
            "gpu_check: work dir /tmp/x",
            gpu_check.result_line("peak", bf16_matmul_tflops=812.5),
            "RESULT {broken json",
            "some RESULT in the middle of a line",
            gpu_check.result_line("pretrain", attn="sdpa", compile=True, stage_vs_plain=1.02),
            "RESULT [1, 2]",
        ]
    )
    results = gpu_check.parse_results(text)
    assert results == [
        {"section": "peak", "bf16_matmul_tflops": 812.5},
        {"section": "pretrain", "attn": "sdpa", "compile": True, "stage_vs_plain": 1.02},
    ]
    out = gpu_check.summary(results)
    assert "peak: bf16_matmul_tflops=812.5" in out and "stage_vs_plain=1.02" in out


def test_curves_match_within_bf16_tolerance_only() -> None:
    ref = [(1, 10.0), (2, 8.0), (3, 6.0)]
    assert gpu_check.curves_match([(1, 10.1), (2, 7.95), (3, 6.05)], ref)[0]
    ok, worst = gpu_check.curves_match([(1, 10.0), (2, 8.0), (3, 6.5)], ref)
    assert not ok and worst == pytest.approx(0.5)
    assert gpu_check.curves_match([(1, 10.0), (2, 8.0)], ref) == (False, float("inf"))
    assert gpu_check.curves_match([], []) == (False, float("inf"))


def test_mfu_and_loss_curve(tmp_path: Path) -> None:
    assert gpu_check.mfu(1000.0, 6e8, 1.2e12) == pytest.approx(0.5)
    assert gpu_check.mfu(1000.0, 6e8, 0.0) != gpu_check.mfu(1000.0, 6e8, 0.0)  # nan
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.5}, {"step": 1, "val_loss": 3.4}, {"step": 2, "loss": 3.1}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert gpu_check.loss_curve(log) == [(1, 3.5), (2, 3.1)]


def test_script_without_cuda_skips_every_section_and_summarises(tmp_path: Path) -> None:
    """On this CPU machine: every section says why it did not run, exit 0, summary printed."""
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for section in gpu_check.SECTIONS:
        assert f"SKIP {section}: no CUDA device" in res.stdout
    assert "==== gpu_check summary ====" in res.stdout
    bad = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--only", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown section(s) nope" in bad.stdout + bad.stderr

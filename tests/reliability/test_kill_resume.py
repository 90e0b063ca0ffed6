"""kill -9, SIGTERM and SIGINT at exact moments of a multi-stage run, then the same command again.

The rerun must complete, never resume from an incomplete checkpoint, and end with results
identical (CPU, fp32) to an uninterrupted run: metrics.json (timings aside), every
predictions file, every final/ weight file and the per-step loss curves.

Moments are exact, not timed: the subprocess pauses right before a chosen rename (the COMPLETE
marker of a checkpoint, a final/ directory, state.json, report.md, a predictions file; see
faultinject/sitecustomize.py), and the test kills or signals it there. The slow sweep adds kills
at seeded random delays.

Fast suite: one chain of interruptions through one run directory (SIGTERM in pretraining, kill -9
while a fine-tuning checkpoint is being written, SIGINT in soft-prompt training, kill -9 between
two stages) and the final rerun. To fit the time budget the SIGINT there is delivered in-process
(a real signal to the test process, handled by the runner's own handler); the slow suite sends
SIGINT and SIGTERM to subprocesses and adds one independent kill per moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from relkit import (
    PIPELINE,
    TRAINING_STAGES,
    cli,
    comparable,
    copy_run,
    loss_curve,
    read_json,
    read_jsonl,
    spawn,
    tree_hashes,
)

STAGES = ("tok", "pre", "sft", "soft", "ev", "ppl", "pred")


def result_files(run_dir: Path) -> dict[str, str]:
    """Hashes of what a run produces: final/ weights and configs, predictions, previews. Text
    files may name their own run directory (a prompted model's base path): that is normalised."""
    keep = ("/final/", "predictions", "prompts_preview")
    out = {}
    for rel in tree_hashes(run_dir):
        if not any(p in rel for p in keep):
            continue
        data = (run_dir / rel).read_bytes()
        if rel.endswith((".json", ".jsonl", ".md", ".txt")):
            data = data.replace(str(run_dir.resolve()).encode(), b"<RUN>")
            data = data.replace(str(run_dir).encode(), b"<RUN>")
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def assert_identical_to_reference(run_dir: Path, reference: Path) -> None:
    state = read_json(run_dir / "state.json")["stages"]
    assert {n: s["status"] for n, s in state.items()} == {n: "done" for n in STAGES}
    assert comparable(read_json(run_dir / "metrics.json")) == comparable(
        read_json(reference / "metrics.json")
    )
    for stage in TRAINING_STAGES:
        ours, ref = (
            loss_curve(run_dir / stage / "metrics.jsonl"),
            loss_curve(reference / stage / "metrics.jsonl"),
        )
        assert ours == ref, f"{stage}: loss curve differs from the uninterrupted run"
    assert result_files(run_dir) == result_files(reference)
    assert_only_complete_checkpoints(run_dir)
    report = (run_dir / "report.md").read_text()
    for stage in STAGES:
        assert f"## {stage}\n\nkind `{state[stage]['kind']}`, status **done**" in report, (
            f"report.md does not show stage '{stage}' as done"
        )


def assert_only_complete_checkpoints(run_dir: Path) -> None:
    from mlsteps.engine.checkpoints import checkpoint_problem, list_checkpoints

    for stage in TRAINING_STAGES:
        for ckpt in list_checkpoints(run_dir / stage / "checkpoints"):
            assert checkpoint_problem(ckpt) is None, f"{ckpt}: {checkpoint_problem(ckpt)}"
    for stage in STAGES:
        leftovers = [p for p in (run_dir / stage).rglob("*") if p.name.endswith((".tmp", ".old"))]
        assert not leftovers, f"temporary files left in {stage}/: {leftovers}"


def orphan_temp_files(run_dir: Path) -> list[str]:
    """Temporary files of run-level atomic writes that a kill left behind (.state.json.XXXX.tmp)."""
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def assert_interrupted(res, run_dir: Path, stage: str, sig: str) -> int:  # type: ignore[no-untyped-def]
    """Exit 130 after a signal: one clean message, the stage marked interrupted, a complete
    checkpoint at the step where it stopped. Returns that step."""
    from mlsteps.engine.checkpoints import checkpoint_problem, checkpoint_step, list_checkpoints

    assert res.code == 130, res.err[-3000:]
    assert "Traceback" not in res.err
    assert f"{sig} received" in res.err
    assert res.error_lines and "run the same command again" in res.error_lines[-1]
    entry = read_json(run_dir / "state.json")["stages"][stage]
    assert entry["status"] != "done" and entry.get("interrupted") is True
    newest = list_checkpoints(run_dir / stage / "checkpoints")[-1]
    assert checkpoint_problem(newest) is None, checkpoint_problem(newest)
    step = checkpoint_step(newest)
    assert step is not None
    logged = [r["step"] for r in read_jsonl(run_dir / stage / "metrics.jsonl") if "loss" in r]
    assert logged and logged[-1] == step, (logged, step)
    return step


def assert_resumed(run_dir: Path, reference: Path, stage: str, from_step: int, err: str) -> None:
    entry = read_json(run_dir / "state.json")["stages"][stage]
    assert entry["resumed"] is True and entry["status"] == "done"
    assert f"[{stage}] resuming from checkpoint-{from_step}" in err
    steps = [r["step"] for r in read_jsonl(run_dir / stage / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)), f"{stage}: steps repeated or out of order: {steps}"
    assert loss_curve(run_dir / stage / "metrics.jsonl") == loss_curve(
        reference / stage / "metrics.jsonl"
    )


def sigint_self_at(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """In this process: deliver a real SIGINT to ourselves right before the rename whose
    destination matches pattern (the runner's handler then asks the stage to stop)."""
    real = os.replace
    regex = re.compile(pattern)
    fired = []

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not fired and regex.search(os.fspath(dst)):
            fired.append(dst)
            os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_interruption_chain_then_rerun_is_identical(
    tmp_path: Path, pipeline_recipe: Path, reference_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    cmd = ["run", pipeline_recipe, "--run-dir", run_dir]

    # 1. SIGTERM while pretraining (paused while checkpoint-2 is being marked complete): the
    #    stage finishes step 3, writes checkpoint-3 (not a save_every multiple) and exits 130.
    proc = spawn(cmd, tmp_path, fault=r"/pre/checkpoints/checkpoint-2/COMPLETE$", tag="term")
    proc.wait_paused()
    proc.signal(signal.SIGTERM)
    proc.resume()
    res = proc.finish()
    assert assert_interrupted(res, run_dir, "pre", "SIGTERM") == 3
    assert "sft" not in read_json(run_dir / "state.json")["stages"]

    # 2. kill -9 while a fine-tuning checkpoint is written (all files there, no COMPLETE yet).
    proc = spawn(cmd, tmp_path, fault=r"/sft/checkpoints/checkpoint-4/COMPLETE$", tag="kill1")
    proc.wait_paused()
    proc.kill()
    assert_resumed(run_dir, reference_run, "pre", 3, proc.stderr())
    torn = run_dir / "sft" / "checkpoints" / "checkpoint-4"
    assert (torn / "model.safetensors").exists() and not (torn / "COMPLETE").exists()

    # 3. Ctrl-C (a real SIGINT, here delivered in-process to save a start-up) while training the
    #    soft prompt; sft resumes from checkpoint-2, never from the torn checkpoint-4.
    with monkeypatch.context() as patch:
        sigint_self_at(patch, r"/soft/checkpoints/checkpoint-2/COMPLETE$")
        res = cli(*cmd)
    assert "ignoring and removing checkpoint-4: no COMPLETE marker" in res.err
    assert_resumed(run_dir, reference_run, "sft", 2, res.err)
    assert assert_interrupted(res, run_dir, "soft", "SIGINT") == 3

    # 4. kill -9 between two stages: 'ev' is finished and recorded in metrics.json, but its
    #    'done' status is not yet in state.json (4th state write: soft running/done, ev running/done).
    proc = spawn(cmd, tmp_path, fault=r"/state\.json$@4", tag="kill2")
    proc.wait_paused()
    proc.kill()
    assert_resumed(run_dir, reference_run, "soft", 3, proc.stderr())
    assert "ev" in read_json(run_dir / "metrics.json")
    assert read_json(run_dir / "state.json")["stages"]["ev"]["status"] == "running"

    # 5. The same command again, to the end: identical to the uninterrupted run.
    res = cli(*cmd)
    assert res.code == 0, res.err[-3000:]
    assert_identical_to_reference(run_dir, reference_run)
    # A kill between writing a temporary file and renaming it leaves the temporary file; the
    # rerun (which holds the lock) should sweep such orphans.
    assert not orphan_temp_files(run_dir), "orphaned temporary files after the rerun"

    # 6. And once more: everything is done, nothing runs, nothing changes.
    before = tree_hashes(run_dir, skip=(".lock", "env.json"))
    res = cli(*cmd, "--json")
    assert res.code == 0, res.err[-3000:]
    stages = json.loads(res.out)["stages"]
    assert all(s["skipped"] for s in stages.values()), stages
    assert tree_hashes(run_dir, skip=(".lock", "env.json")) == before


def test_torn_and_damaged_checkpoints_are_never_loaded(
    tmp_path: Path, mini_run: Path, reference_run: Path, pipeline_recipe: Path
) -> None:
    """A checkpoint without COMPLETE, or whose weights no longer match the manifest, or whose
    safetensors header does not cover the file, is removed and an older one is resumed."""
    run_dir = copy_run(mini_run, tmp_path / "run")
    state = read_json(run_dir / "state.json")
    state["stages"]["pre"].update(status="failed", interrupted=True)
    (run_dir / "state.json").write_text(json.dumps(state))
    ckpts = run_dir / "pre" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    import shutil

    shutil.rmtree(run_dir / "pre" / "final")
    # checkpoint-8: weights truncated, manifest rewritten to match (a torn write that got marked)
    weights = ckpts / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    manifest = json.loads((ckpts / "checkpoint-8" / "COMPLETE").read_text())
    manifest["files"]["model.safetensors"] = weights.stat().st_size
    (ckpts / "checkpoint-8" / "COMPLETE").write_text(json.dumps(manifest))
    # checkpoint-7: a copy of checkpoint-6 whose optimizer state shrank after marking
    shutil.copytree(ckpts / "checkpoint-6", ckpts / "checkpoint-7")
    (ckpts / "checkpoint-7" / "optimizer.pt").write_bytes(b"\0" * 10)
    # checkpoint-9 would be past max_steps anyway: no marker at all
    shutil.copytree(ckpts / "checkpoint-6", ckpts / "checkpoint-9")
    (ckpts / "checkpoint-9" / "COMPLETE").unlink()
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(PIPELINE[: PIPELINE.index("  sft:\n")])
    res = cli("run", recipe, "--run-dir", run_dir)
    assert res.code == 0, res.err[-3000:]
    assert "ignoring and removing checkpoint-9: no COMPLETE marker" in res.err
    assert (
        "ignoring and removing checkpoint-8: model.safetensors is not a valid safetensors"
        in res.err
    )
    assert "ignoring and removing checkpoint-7: optimizer.pt has 10 bytes" in res.err
    assert "[pre] resuming from checkpoint-6" in res.err
    assert comparable(read_json(run_dir / "metrics.json")["pre"]) == comparable(
        read_json(reference_run / "metrics.json")["pre"]
    )
    assert tree_hashes(run_dir / "pre" / "final") == tree_hashes(reference_run / "pre" / "final")


# ------------------------------------------------------------------ the slow sweep

# (id, fault point REGEX@N, kind of moment). state.json is written twice per stage (running,
# done) after the first write; report.md once per finished stage.
MOMENTS = [
    ("tokenizer-final", r"/tok/final$", "inside the tokenizer stage, final/ not yet in place"),
    ("pretrain-ckpt-write", r"/pre/checkpoints/checkpoint-4/COMPLETE$", "checkpoint write"),
    ("pretrain-final", r"/pre/final$", "after training, final/ not yet in place"),
    ("between-pre-and-sft", r"/state\.json$@4", "pre done (metrics.json written), state not yet"),
    ("report-after-pre", r"/report\.md$@2", "while writing the report after pre"),
    ("finetune-ckpt-write", r"/sft/checkpoints/checkpoint-2/COMPLETE$", "first checkpoint write"),
    ("finetune-predictions", r"/sft/predictions\.jsonl$", "validation predictions written"),
    ("prompt-ckpt-write", r"/soft/checkpoints/checkpoint-4/COMPLETE$", "soft prompt checkpoint"),
    ("prompt-preview", r"/soft/prompts_preview\.jsonl$", "soft prompt preview"),
    ("eval-predictions", r"/ev/predictions\.jsonl$", "inside the eval stage"),
    ("between-ev-and-ppl", r"/state\.json$@11", "ev recorded, next stage not started"),
    ("predict-predictions", r"/pred/predictions\.jsonl$", "inside the predict stage"),
    ("final-report", r"/report\.md$@7", "while writing the last report"),
]


@pytest.mark.slow
@pytest.mark.parametrize("point", [m[1] for m in MOMENTS], ids=[m[0] for m in MOMENTS])
def test_kill_at_exact_moment_then_rerun(
    point: str, tmp_path: Path, pipeline_recipe: Path, reference_run: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = ["run", pipeline_recipe, "--run-dir", run_dir]
    proc = spawn(cmd, tmp_path, fault=point, tag="kill")
    where = proc.wait_paused()
    proc.kill()
    torn = None
    if "checkpoints" in where:
        torn = Path(where.split()[1]).parent
        assert not (torn / "COMPLETE").exists()
    res = cli(*cmd)
    assert res.code == 0, res.err[-3000:]
    if torn is not None:
        assert f"ignoring and removing {torn.name}: no COMPLETE marker" in res.err
    assert_identical_to_reference(run_dir, reference_run)
    assert not orphan_temp_files(run_dir), "orphaned temporary files after the rerun"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_seeded_random_delay_then_rerun(
    seed: int, tmp_path: Path, pipeline_recipe: Path, reference_run: Path
) -> None:
    """kill -9 once the first stage started plus a seeded delay (a fuzz of moments the exact
    points above do not name, e.g. mid-step, while datasets map, while torch saves)."""
    run_dir = tmp_path / "run"
    cmd = ["run", pipeline_recipe, "--run-dir", run_dir]
    proc = spawn(cmd, tmp_path, tag="delay")
    proc.wait_for(lambda: (run_dir / "state.json").exists())
    time.sleep(random.Random(seed).uniform(0.5, 12.0))
    was_running = proc.popen.poll() is None
    proc.kill()
    res = cli(*cmd)
    assert res.code == 0, res.err[-3000:]
    assert_identical_to_reference(run_dir, reference_run)
    if not was_running:
        pytest.skip("the run finished before the delay elapsed: no kill happened")

"""Preference-stage throughput: the `preference` stage (DPO) against TRL's DPOTrainer called
directly on the same model, data and settings. Targets: tokens/s >= 0.95x the direct call, peak
memory (RSS on CPU, CUDA max allocated on a GPU) <= 1.1x.

Each variant runs in its own subprocess (a fresh peak-memory count), alternating A, B, A, B ...
Both train the same GPT-2 (saved once, loaded from disk by both) on the same toy/preference rows,
with the same batch size, steps, learning rate, seed, precision, optimizer and no gradient
checkpointing; neither evaluates or checkpoints during the timed steps. Tokens are the non-pad
tokens of every training batch (chosen and rejected sequences), counted the same way in both;
the time is the ``trainer.train()`` loop (the stage reports its own, evaluation excluded).

    .venv/bin/python bench/preference.py [--quick] [--steps N] [--reps N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPEED_TARGET = 0.95
MEMORY_TARGET = 1.1
ARCH = {"layers": 4, "width": 128, "heads": 4, "positions": 256}


def _rows(n: int) -> list[dict[str, str]]:
    from mlsteps.builtin import load_builtin

    return [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in load_builtin("toy/preference", "train")[:n]
    ]


def _prepare(workdir: Path) -> Path:
    """A random GPT-2 with the bench tokenizer, saved once: the `from` model of both runs."""
    from transformers import AutoTokenizer

    from mlsteps.engine.modeling import build_model

    out = workdir / "base"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(common.bench_tokenizer(8000))
    model = build_model(
        common.gpt2_arch(ARCH["layers"], ARCH["width"], ARCH["heads"], ARCH["positions"]),
        tok,
        "causal_lm",
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return common.peak_rss_mb()


def run_mlsteps(base: Path, steps: int, batch: int, workdir: Path) -> dict[str, float]:
    from mlsteps.context import StageContext
    from mlsteps.recipe.specs.preference import PreferenceSpec
    from mlsteps.stages import preference

    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(steps * batch)))
    spec = PreferenceSpec.model_validate(
        {
            "kind": "preference", "method": "dpo", "from": str(base), "data": str(data),
            "validation_fraction": 0, "max_seq_len": 256, "beta": 0.1,
            "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "warmup_steps": 0,
                      "log_every_steps": 10, "save_every_steps": 100000, "precision": "fp32"},
        }
    )  # fmt: skip
    ctx = StageContext(run_dir=workdir / "run", stage="pref", kind="preference", seed=0, quiet=True)
    result = preference.run(spec, ctx)
    return {"tokens_per_s": float(result.metrics["tokens_per_s"]), "peak_mb": _peak_mb()}


def run_direct(base: Path, steps: int, batch: int, workdir: Path) -> dict[str, float]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mlsteps.engine.train_callbacks import count_tokens

    tokens = {"n": 0}

    class Counting(DPOTrainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            tokens["n"] += count_tokens(args[1])
            return super().training_step(*args, **kwargs)

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(workdir / "direct"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, beta=0.1,
        max_length=256, bf16=False, gradient_checkpointing=False, logging_steps=10,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0,
        optim="adamw_torch_fused" if _fused() else "adamw_torch",
        dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    trainer = Counting(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(_rows(steps * batch)),
        processing_class=tok,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens["n"] / seconds, "peak_mb": _peak_mb()}


def _fused() -> bool:
    import torch

    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError):
        return False
    return True


VARIANTS = {"mlsteps preference stage": run_mlsteps, "TRL DPOTrainer, direct": run_direct}


def _child(variant: str, steps: int, batch: int, threads: int) -> dict[str, float]:
    argv = [common.PY, __file__, "--child", variant, "--steps", str(steps), "--batch", str(batch),
            "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=common.REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args()
    threads = common.setup_threads(args.threads)
    steps = args.steps or (10 if args.quick else 40)
    if args.child:
        workdir = common.CACHE / "bench-preference"
        workdir.mkdir(parents=True, exist_ok=True)
        base = _prepare(workdir)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            print(json.dumps(VARIANTS[args.child](base, steps, args.batch, Path(tmp))))
        return
    reps = args.reps or (1 if args.quick else 3)
    common.log(f"{reps} rep(s) x {len(VARIANTS)} variants, {steps} steps, batch {args.batch}")
    runs = common.interleave(
        {name: (lambda n=name: _child(n, steps, args.batch, threads)) for name in VARIANTS}, reps
    )
    speed = {k: common.median([r["tokens_per_s"] for r in v]) for k, v in runs.items()}
    memory = {k: common.median([r["peak_mb"] for r in v]) for k, v in runs.items()}
    ours, direct = VARIANTS
    speed_ratio = speed[ours] / speed[direct]
    mem_ratio = memory[ours] / memory[direct]
    rows = [[k, round(speed[k], 1), round(memory[k], 1)] for k in VARIANTS]
    md = (
        common.table(["variant", "tokens/s (median)", "peak memory MB"], rows)
        + f"\n\nspeed ratio {speed_ratio:.3f} (target >= {SPEED_TARGET}: "
        f"{common.verdict(speed_ratio, SPEED_TARGET)}); memory ratio {mem_ratio:.3f} "
        f"(target <= {MEMORY_TARGET}: {common.verdict(mem_ratio, MEMORY_TARGET, False)})\n"
    )
    print(md)
    common.write_results(
        "preference",
        quick=args.quick,
        result={"runs": runs, "steps": steps, "batch": args.batch, "arch": ARCH},
        markdown=md,
        headline={"speed_ratio": round(speed_ratio, 3), "memory_ratio": round(mem_ratio, 3)},
        no_write=args.no_write,
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

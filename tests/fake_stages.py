"""A fake stage implementation for runner tests: installs itself as every stage kind.

Behaviour is driven by a plain dict (in-process tests) or environment variables (subprocess
tests), so the runner's bookkeeping is tested without training anything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from mlsteps.context import StageContext, StageResult
from mlsteps.errors import StageInterrupted, UserError

CALLS: list[str] = []
BEHAVIOUR: dict[str, str] = {}  # stage -> "fail" | "user_error" | "wait_for_stop" | "nan" | ...


def run(spec: Any, ctx: StageContext) -> StageResult:
    CALLS.append(ctx.stage)
    mode = BEHAVIOUR.get(ctx.stage) or os.environ.get(f"FAKE_{ctx.stage.upper()}", "")
    if mode == "fail":
        raise RuntimeError("boom")
    if mode == "user_error":
        raise UserError("column 'text' not found", where=f"stages.{ctx.stage}.data")
    ckpt = ctx.checkpoints_dir / "step"
    resumed_from = int(ckpt.read_text()) if ckpt.exists() else 0
    if mode == "wait_for_stop" and resumed_from == 0:
        (ctx.stage_dir / "started").write_text("1")
        step = 0
        while not ctx.stop_requested:
            step += 1
            time.sleep(0.01)
        ctx.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text(str(step))
        raise StageInterrupted(f"stopped at step {step}")
    if mode == "nan":  # a model whose weights hold NaN scores NaN (and an overflow, inf)
        return StageResult(metrics={"perplexity": float("nan"), "loss": float("inf"), "n": 3})
    if mode == "metrics_only":  # like eval: no final/, only metrics and a predictions file
        ctx.predictions_path.write_text('{"prediction": "x"}\n')
        return StageResult(
            metrics={"bleu": 1.0}, outputs={"predictions": str(ctx.predictions_path)}
        )
    ctx.final_dir.mkdir(parents=True, exist_ok=True)
    upstream = {k: str(v) for k, v in ctx.upstream.items()}
    (ctx.final_dir / "info.json").write_text(json.dumps({"upstream": upstream}))
    return StageResult(
        metrics={"resumed_from": resumed_from, "loss": 1.5}, outputs={"final": str(ctx.final_dir)}
    )


def install() -> None:
    """Make every stage kind dispatch to this module."""
    module = sys.modules[__name__]
    for kind in ("tokenizer", "pretrain", "finetune", "prompt", "eval", "predict"):
        sys.modules[f"mlsteps.stages.{kind}"] = module


if __name__ == "__main__":
    # python tests/fake_stages.py <mlsteps cli args...>
    install()
    from mlsteps.cli import main

    main(sys.argv[1:])

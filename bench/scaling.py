"""Scaling of `mlsteps pretrain`: tokens/s and peak memory at three model sizes (fixed sequence
length) and three sequence lengths (fixed model), through the real stage (see bench/pretrain.py
for how steady-state tokens/s is measured), with the fitted growth: the log-log slope of
time/token against parameters and against sequence length.

For a compute-bound transformer, time/token grows about linearly with N (slope ~1 against
parameters) and, at fixed N, slowly with length (only the attention term 12·L·d·seq grows, so
the slope against length stays well under 1 until attention dominates).

    .venv/bin/python bench/scaling.py [--quick] [--steps N]
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pretrain  # noqa: E402

SIZES = [(2, 128, 2), (4, 256, 4), (6, 384, 6)]  # layers, width, heads
LENGTHS = [128, 256, 512]
QUICK_SIZES = [(1, 64, 1), (2, 128, 2), (3, 192, 3)]
QUICK_LENGTHS = [64, 128, 256]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def measure(
    layers: int,
    width: int,
    heads: int,
    seq: int,
    batch: int,
    steps: int,
    log_every: int,
    work: Path,
    tok_dir: Path,
) -> dict[str, Any]:
    from mlsteps.engine.modeling import build_model, load_tokenizer

    cfg = {"layers": layers, "width": width, "heads": heads, "seq": seq, "batch": batch}
    tok = load_tokenizer(str(tok_dir))
    arch = common.gpt2_arch(layers, width, heads, seq)
    n = common.compute_params(build_model(arch, tok, "clm"))
    res = pretrain.run_mlsteps(cfg, tok_dir, work, steps, log_every, "fp32")
    fpt = common.flops_per_token(n, layers, width, seq)
    return {
        **cfg,
        "params": n,
        "flops_per_token": fpt,
        **res,
        "us_per_token": 1e6 / res["tokens_per_s"],
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 7)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    steps = args.steps or (4 if args.quick else 7)
    log_every = 2
    sizes, lengths = (QUICK_SIZES, QUICK_LENGTHS) if args.quick else (SIZES, LENGTHS)
    batch = 8
    tok_dir = common.bench_tokenizer(8000)
    pretrain.TOK_DIR = tok_dir
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    peak = common.matmul_flops(1024, 2.0)  # measured at the start and the end: the best counts
    mid = sizes[1]
    fixed_seq = lengths[1]
    rows: list[dict[str, Any]] = []
    for layers, width, heads in sizes:
        rows.append(
            {
                "sweep": "size",
                **measure(layers, width, heads, fixed_seq, batch, steps, log_every, work, tok_dir),
            }
        )
        common.log(f"size {layers}x{width}: {rows[-1]['tokens_per_s']:.0f} tok/s")
    for seq in lengths:
        if seq == fixed_seq:  # the middle point is the middle size's run
            rows.append({**next(r for r in rows if r["width"] == mid[1]), "sweep": "length"})
            continue
        rows.append(
            {"sweep": "length", **measure(*mid, seq, batch, steps, log_every, work, tok_dir)}
        )
        common.log(f"seq {seq}: {rows[-1]['tokens_per_s']:.0f} tok/s")
    peak = max(peak, common.matmul_flops(1024, 2.0))
    size_rows = [r for r in rows if r["sweep"] == "size"]
    len_rows = [r for r in rows if r["sweep"] == "length"]
    s_params = slope([r["params"] for r in size_rows], [r["us_per_token"] for r in size_rows])
    s_len = slope([r["seq"] for r in len_rows], [r["us_per_token"] for r in len_rows])
    s_flops_p = slope([r["params"] for r in size_rows], [r["flops_per_token"] for r in size_rows])
    s_flops_l = slope([r["seq"] for r in len_rows], [r["flops_per_token"] for r in len_rows])
    out = common.table(
        ["sweep", "layers x d", "seq", "params N", "tokens/s", "µs/token", "MFU", "peak RSS +MB"],
        [
            [
                r["sweep"],
                f"{r['layers']}x{r['width']}",
                r["seq"],
                r["params"],
                r["tokens_per_s"],
                r["us_per_token"],
                r["tokens_per_s"] * r["flops_per_token"] / peak,
                r["peak_rss_delta_mb"],
            ]
            for r in rows
        ],
    )
    fit = (
        f"Fitted log-log slope of time/token: vs parameters {s_params:.2f} (the FLOP model "
        f"6N+12·L·d·seq predicts {s_flops_p:.2f}); vs sequence length {s_len:.2f} (FLOP model "
        f"{s_flops_l:.2f}). Peak = measured fp32 matmul {peak / 1e9:.1f} GFLOP/s."
    )
    head = (
        f"`pretrain` stage through the runner, GPT-2, batch {batch}, fp32, {steps} steps "
        f"per point, the first {log_every} excluded; one run per point (a scan, not a "
        f"side-by-side comparison). Size sweep at seq {fixed_seq}; length sweep at "
        f"{mid[0]}x{mid[1]}."
    )
    print(head + "\n\n" + out + "\n\n" + fit)
    common.write_results(
        "scaling",
        quick=args.quick,
        result={
            "rows": rows,
            "slope_params": s_params,
            "slope_length": s_len,
            "flop_model_slope_params": s_flops_p,
            "flop_model_slope_length": s_flops_l,
            "matmul_flops": peak,
        },
        markdown=head + "\n\n" + out + "\n\n" + fit,
        headline={"slope_params": round(s_params, 2), "slope_length": round(s_len, 2)},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

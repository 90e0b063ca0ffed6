"""Pretraining throughput: `mlsteps pretrain` (the real stage, through the runner) vs a plain
PyTorch loop on the same model and the same packed wikitext-2 tokens; MFU of each; and the time
and peak RSS of tokenising + packing ~10 MB of text through the pretrain data path.

Steady state: the stage's own records in metrics.jsonl are time-stamped by this script as they
are written (a wrapper around ``_JsonlWriter.write``; the stage's code is unchanged), and tokens/s
is (optimizer steps between the first and last log record) x batch x seq / elapsed, so model
building, tokenisation, the first ``--log-every`` steps (warm-up) and the final save are excluded.
The plain loop is timed over the same steps. Runs alternate (mlsteps, plain, mlsteps, ...).

    .venv/bin/python bench/pretrain.py [--quick] [--steps N] [--reps N]
    .venv/bin/python bench/pretrain.py --preset gpt2-124m --precision bf16   # on a GPU
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "small": {"layers": 4, "width": 256, "heads": 4, "seq": 256, "batch": 8, "vocab": 8000},
    "gpt2-124m": {
        "layers": 12,
        "width": 768,
        "heads": 12,
        "seq": 1024,
        "batch": 16,
        "vocab": 50257,
    },
}
TARGET_RATIO = 1.05
TARGET_MFU = 0.50


def packed_blocks(tokenizer: Any, lines: list[str], seq: int) -> Any:
    """wikitext lines tokenised, joined with EOS, cut into full ``seq`` blocks (a LongTensor)."""
    import torch

    ids: list[int] = []
    for row in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def run_mlsteps(
    cfg: dict[str, Any], tok_dir: Path, workdir: Path, steps: int, log_every: int, precision: str
) -> dict[str, float]:
    """One `pretrain` stage through the runner; tokens/s between the first and last log record
    (``common.stage_probe``: the blocks are packed, so every token is a real token)."""
    from mlsteps.recipe import validate_recipe
    from mlsteps.runner import run_recipe

    raw = {
        "name": "bench-pretrain",
        "seed": 0,
        "stages": {
            "pretrain": {
                "kind": "pretrain",
                "objective": "clm",
                "tokenizer": str(tok_dir),
                "model": {
                    "family": "gpt2",
                    "n_layers": cfg["layers"],
                    "hidden_size": cfg["width"],
                    "n_heads": cfg["heads"],
                    "max_positions": cfg["seq"],
                },
                "data": {"files": [str(common.DATA / "wikitext-2" / "valid.txt")]},
                "validation_fraction": 0.0,
                "max_seq_len": cfg["seq"],
                "train": {
                    "batch_size": cfg["batch"],
                    "max_steps": steps,
                    "lr": 5e-4,
                    "precision": precision,
                    "log_every_steps": log_every,
                    "save_every_steps": steps * 10,
                    "group_by_length": False,
                },
            }
        },
    }
    recipe = validate_recipe(raw)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    with common.stage_probe() as probe, common.RssSampler() as rss:
        run_recipe(recipe, run_dir, quiet=True)
    steady = probe.steady()
    metrics = json.loads((run_dir / "metrics.json").read_text())["pretrain"]
    return {
        "tokens_per_s": steady["real_tokens_per_s"],
        "tokens_per_cpu_s": steady["real_tokens_per_cpu_s"],
        "self_reported_tokens_per_s": steady["self_reported_tokens_per_s"],
        "timed_steps": steady["timed_steps"],
        "final_loss": steady["final_loss"],
        "peak_rss_delta_mb": rss.peak_mb - rss.baseline_mb,
        "stage_metrics_tokens_per_s": float(metrics.get("tokens_per_s", math.nan)),
    }


def run_plain(
    cfg: dict[str, Any], blocks: Any, vocab: int, steps: int, warm: int, precision: str, device: str
) -> dict[str, float]:
    """The reference: the same model, AdamW, clip 1.0, cosine lr; data already tensorised."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from mlsteps.engine.modeling import build_model, load_tokenizer

    tok = load_tokenizer(str(TOK_DIR))
    torch.manual_seed(0)
    arch = common.gpt2_arch(cfg["layers"], cfg["width"], cfg["heads"], cfg["seq"])
    model = build_model(arch, tok, "clm").to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, steps)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(blocks.shape[0], generator=gen)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    loss = torch.zeros(())
    with common.RssSampler() as rss:
        for step in range(1, steps + 1):
            if step == warm + 1:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
            idx = order[((step - 1) * cfg["batch"]) % len(order) :][: cfg["batch"]]
            x = blocks[idx].to(device, non_blocking=True)
            with amp:
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        final = float(loss.detach())  # syncs
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens_per_s": (steps - warm) * cfg["batch"] * cfg["seq"] / elapsed,
        "tokens_per_cpu_s": (steps - warm) * cfg["batch"] * cfg["seq"] / cpu,
        "timed_steps": steps - warm,
        "final_loss": final,
        "peak_rss_delta_mb": rss.peak_mb - rss.baseline_mb,
    }


TOK_DIR = Path()


def optimizer_step_ms(model: Any, reps: int = 5) -> dict[str, float]:
    """Median ms of one AdamW step over ``model``'s parameters per torch implementation
    (single-tensor: the CPU default of both mlsteps' 'adamw_torch' and the plain loop)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, kwargs in (
        ("single-tensor", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        try:
            opt = torch.optim.AdamW(params, lr=1e-6, **kwargs)
            opt.step()
        except (RuntimeError, TypeError) as exc:  # fused not available for this device/dtype
            common.log(f"AdamW {name}: {exc}")
            continue
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = common.median(times) * 1000
    return out


def pack_child(mb: float) -> None:
    """Child process: tokenise + pack ~``mb`` MB of wikitext through the pretrain data path."""
    from mlsteps.engine.data import load_rows
    from mlsteps.recipe.specs.data import DataSpec
    from mlsteps.stages.pretrain import lm_data

    tmp = Path(tempfile.mkdtemp())
    text = (common.DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    big = tmp / "wiki10mb.txt"
    big.write_text(text * max(1, round(mb * 2**20 / len(text.encode()))), encoding="utf-8")
    from mlsteps.engine.modeling import load_tokenizer

    tok = load_tokenizer(str(TOK_DIR))
    sampler = common.RssSampler(interval_s=0.02).__enter__()
    t0 = time.perf_counter()
    rows = load_rows(DataSpec(files=[str(big)]), cache_dir=tmp / "cache")
    # What mlsteps.stages.pretrain._pack does for clm.
    path = "engine.data.load_rows + lm_data.tokenize_documents + lm_data.pack_blocks"
    tokenized = lm_data.tokenize_documents(rows, tok, "text", end_id=tok.eos_token_id)
    blocks = lm_data.pack_blocks(tokenized, 256, keep_remainder=False)
    n_blocks = len(blocks)
    seconds = time.perf_counter() - t0
    sampler.__exit__()
    peak, base = sampler.peak_mb, sampler.baseline_mb
    mb_real = big.stat().st_size / 2**20
    print(
        json.dumps(
            {
                "mb": mb_real,
                "seconds": seconds,
                "mb_per_s": mb_real / seconds,
                "peak_rss_mb": peak,
                "rss_before_mb": base,
                "blocks": n_blocks,
                "path": path,
            }
        )
    )


def main() -> None:
    global TOK_DIR
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12)")
    p.add_argument("--log-every", type=int, default=None, help="warm-up steps excluded (default 3)")
    p.add_argument("--reps", type=int, default=None, help="runs per implementation (default 3)")
    p.add_argument("--pack-mb", type=float, default=None, help="MB of text to pack (default 10)")
    p.add_argument("--skip-pack", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile one extra mlsteps run")
    p.add_argument("--pack-child", type=float, default=None, help="internal")
    args = p.parse_args()
    common.setup_threads(args.threads)
    cfg = PRESETS[args.preset]
    TOK_DIR = common.bench_tokenizer(cfg["vocab"])
    if args.pack_child is not None:
        pack_child(args.pack_child)
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (4 if args.quick else 12)
    log_every = args.log_every or (2 if args.quick else 3)
    reps = args.reps or (1 if args.quick else 3)
    if args.quick and args.preset == "small":
        cfg = {**cfg, "layers": 2, "width": 128, "heads": 2, "seq": 128}
    from mlsteps.engine.modeling import build_model, load_tokenizer

    tok = load_tokenizer(str(TOK_DIR))
    blocks = packed_blocks(tok, common.wikitext_lines("valid"), cfg["seq"])
    arch = common.gpt2_arch(cfg["layers"], cfg["width"], cfg["heads"], cfg["seq"])
    probe_model = build_model(arch, tok, "clm").to(device)
    n_params = common.compute_params(probe_model)
    opt_ms = optimizer_step_ms(probe_model)
    del probe_model
    fpt = common.flops_per_token(n_params, cfg["layers"], cfg["width"], cfg["seq"])
    mm_dtype = "bfloat16" if args.precision == "bf16" else "float32"
    mm_n = 8192 if device == "cuda" else 1024
    peak = common.matmul_flops(mm_n, 2.0, mm_dtype, device)
    label = "mlsteps pretrain (stage via runner)"
    common.log(
        f"{label}; {cfg}; {steps} steps, first {log_every} excluded; {reps} reps; "
        f"N={n_params:,}; {fpt / 1e6:.1f} MFLOP/token; matmul {peak / 1e9:.1f} GFLOP/s"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    results: dict[str, list[dict[str, float]]] = {"mlsteps": [], "plain": []}
    for rep in range(reps):
        a = run_mlsteps(cfg, TOK_DIR, work, steps, log_every, args.precision)
        b = run_plain(cfg, blocks, len(tok), steps, log_every, args.precision, device)
        results["mlsteps"].append(a)
        results["plain"].append(b)
        common.log(
            f"rep {rep + 1}: mlsteps {a['tokens_per_s']:.0f} tok/s, "
            f"plain {b['tokens_per_s']:.0f} tok/s"
        )
    peak = max(peak, common.matmul_flops(mm_n, 2.0, mm_dtype, device))
    rows, summary = [], {}
    for name, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        med = common.median(tps)
        cpu_med = common.median([r["tokens_per_cpu_s"] for r in runs])
        summary[name] = {
            "tokens_per_s": med,
            "mfu": med * fpt / peak,
            "tokens_per_cpu_s": cpu_med,
            "mfu_cpu_time": cpu_med * fpt / peak,
            "runs": runs,
        }
        rows.append(
            [
                label if name == "mlsteps" else "plain PyTorch loop",
                med,
                min(tps),
                max(tps),
                med * fpt / peak,
                cpu_med,
                cpu_med * fpt / peak,
                common.median([r["peak_rss_delta_mb"] for r in runs]),
                common.median([r["final_loss"] for r in runs]),
            ]
        )
    ratio = summary["mlsteps"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    pair = common.median(
        [
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(results["mlsteps"], results["plain"], strict=True)
        ]
    )
    out = common.table(
        [
            "implementation",
            "tokens/s (median)",
            "min",
            "max",
            "MFU",
            "tokens/CPU-s",
            "MFU per CPU-s",
            "peak RSS +MB",
            "final loss",
        ],
        rows,
    )
    mfu = summary["mlsteps"]["mfu"]
    mfu_cpu = summary["mlsteps"]["mfu_cpu_time"]
    cpu_ratio = summary["mlsteps"]["tokens_per_cpu_s"] / summary["plain"]["tokens_per_cpu_s"]
    head = (
        f"Model: GPT-2 {cfg['layers']} layers, d={cfg['width']}, {cfg['heads']} heads, seq "
        f"{cfg['seq']}, batch {cfg['batch']}, vocab {len(tok)}, {args.precision}, AdamW, "
        f"{device}. N={n_params:,} (position table excluded, tied head counted once), "
        f"{fpt / 1e6:.2f} MFLOP/token = 6N + 12·L·d·seq. Peak = measured {mm_dtype} "
        f"{mm_n}x{mm_n} matmul: {peak / 1e9:.1f} GFLOP/s. {steps} steps per run, the first "
        f"{log_every} excluded; {reps} alternating runs each."
    )
    verdicts = (
        f"ratio mlsteps/plain = {ratio:.3f} (median of per-pair ratios {pair:.3f}); "
        f"target >= {TARGET_RATIO}: {common.verdict(ratio, TARGET_RATIO)}; by CPU time "
        f"{cpu_ratio:.3f}. MFU mlsteps {mfu:.1%} (per CPU-second {mfu_cpu:.1%}), target >= "
        f"{TARGET_MFU:.0%}: {common.verdict(mfu, TARGET_MFU)}. Tokens/CPU-s and MFU per CPU-s "
        f"divide by the process's CPU time instead of wall time: on a shared CPU they show what "
        f"the code does with the CPU it gets."
    )
    otable = common.table(["AdamW implementation", "ms per optimizer step"], list(opt_ms.items()))
    print(head + "\n\n" + out + "\n\n" + verdicts + "\n\n" + otable)
    md = [head, out, verdicts, "AdamW step alone (same parameters, random gradients):", otable]
    pack: dict[str, Any] = {}
    if not args.skip_pack:
        mb = args.pack_mb or (1.0 if args.quick else 10.0)
        proc = subprocess.run(
            [sys.executable, __file__, "--pack-child", str(mb), "--preset", args.preset],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            pack = json.loads(proc.stdout.strip().splitlines()[-1])
            ptable = common.table(
                ["text MB", "seconds", "MB/s", "peak RSS MB", "RSS before MB", "blocks", "path"],
                [
                    [
                        pack[k]
                        for k in (
                            "mb",
                            "seconds",
                            "mb_per_s",
                            "peak_rss_mb",
                            "rss_before_mb",
                            "blocks",
                            "path",
                        )
                    ]
                ],
            )
            print("\nTokenise + pack (wikitext-2 valid repeated, seq 256):\n" + ptable)
            md += ["Tokenise + pack (wikitext-2 valid repeated, own process):", ptable]
        else:
            common.log(f"pack child failed: {proc.stderr[-2000:]}")
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run_mlsteps(cfg, TOK_DIR, work, steps, log_every, args.precision)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(buf.getvalue())
    common.write_results(
        "pretrain",
        quick=args.quick,
        result={
            "config": cfg,
            "precision": args.precision,
            "device": device,
            "steps": steps,
            "warmup_steps": log_every,
            "n_params": n_params,
            "flops_per_token": fpt,
            "matmul_flops": peak,
            "impl": label,
            "summary": summary,
            "ratio": ratio,
            "pair_ratio": pair,
            "cpu_time_ratio": cpu_ratio,
            "pack": pack,
            "adamw_step_ms": opt_ms,
        },
        markdown="\n\n".join(md),
        headline={
            "ratio": round(ratio, 3),
            "mfu_mlsteps": round(mfu, 3),
            "mfu_cpu_mlsteps": round(mfu_cpu, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "mfu_plain": round(summary["plain"]["mfu"], 3),
            "pack_s": round(pack.get("seconds", math.nan), 2),
        },
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

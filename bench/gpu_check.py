"""The prepared GPU check (issue 19), called by bench/gpu_check.sh. Sections (``--only``):

- ``peak``: bf16 matmul rate (8192^3 products): the practical peak MFU is measured against.
- ``pretrain``: a GPT-2-124M-shaped model (12 x 768, 12 heads, 1024 positions) built from config,
  bf16, through the ``pretrain`` stage (``mlsteps run``; torch.compile off/on) against a plain
  PyTorch bf16 loop on the same packed blocks (eager and sdpa attention, compile off/on):
  tokens/s, ratio, MFU. mlsteps has no attention knob: the stage uses transformers' default (sdpa).
- ``fsdp``, ``zero2``, ``zero3``: the same recipe with ``distributed: {fsdp: full_shard}`` or
  ``{deepspeed: {zero_stage: 2|3}}`` on every GPU: kill -9 after a complete checkpoint, rerun,
  check it completes and that its loss curve matches the plain run's within bf16 tolerance.
  DeepSpeed is an optional extra: without it these print SKIP.
- ``qlora``: LoRA on a ~0.5B Llama-shaped model built from config, bf16 weights vs 4-bit NF4
  (bitsandbytes) weights: peak GPU memory and tokens/s. mlsteps has no 4-bit loading, so this
  section uses transformers + peft + bitsandbytes directly (what a QLoRA path would run).

Without CUDA every section prints ``SKIP <section>: ...`` and the script exits 0, unless
``--cpu-smoke`` asks for the ``pretrain`` comparison on a tiny fp32 model on the CPU (to check
the plumbing). Every result is one line ``RESULT <json>``; the summary at the end is built from
those lines (``parse_results``), also when a section crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTIONS = ("peak", "pretrain", "fsdp", "zero2", "zero3", "qlora")
GPT2_124M = {
    "family": "gpt2",
    "n_layers": 12,
    "hidden_size": 768,
    "n_heads": 12,
    "max_positions": 1024,
}
TINY = {"family": "gpt2", "n_layers": 2, "hidden_size": 32, "n_heads": 2, "max_positions": 64}
# bf16 runs of one recipe differ by rounding, not by trend: per-step losses within this
# (absolute + relative) band count as the same curve.
LOSS_ATOL, LOSS_RTOL = 0.05, 0.02


def vocab_for(arch: dict) -> int:
    """GPT-2's vocabulary for the 124M shape (a BPE asked for 50,257 tokens on wikitext-2; it
    may reach fewer, printed in the results); the tiny CPU smoke model gets 8,000."""
    return 50257 if arch is GPT2_124M else 8000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS)
    )
    p.add_argument("--steps", type=int, default=60, help="training steps per pretrain run")
    p.add_argument("--budget-s", type=int, default=570, help="stop starting sections after this")
    p.add_argument("--out", default=None, help="working folder (default: a temp dir)")
    p.add_argument("--cpu-smoke", action="store_true", help="no CUDA: tiny fp32 pretrain check")
    p.add_argument("--summarize", default=None, help="only print the summary of this output log")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.steps < 10:
        p.error("--steps must be at least 10 (the first steps are warm-up)")
    args.sections = chosen
    return args


def result_line(section: str, **values: Any) -> str:
    """One machine-readable result: ``RESULT {"section": ..., ...}``."""
    return "RESULT " + json.dumps({"section": section, **values}, sort_keys=True, default=str)


def parse_results(text: str) -> list[dict[str, Any]]:
    """The ``RESULT {...}`` lines of a run's output (others, and broken JSON, are ignored)."""
    out = []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            try:
                value = json.loads(line[len("RESULT ") :])
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


def curves_match(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> tuple[bool, float]:
    """Same steps, and every loss within LOSS_ATOL + LOSS_RTOL * |reference|; also the largest
    absolute difference (inf when the steps differ)."""
    if [s for s, _ in a] != [s for s, _ in b] or not a:
        return False, float("inf")
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    ok = all(
        abs(x - y) <= LOSS_ATOL + LOSS_RTOL * abs(y) for (_, x), (_, y) in zip(a, b, strict=True)
    )
    return ok, worst


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else float("nan")


def loss_curve(metrics_jsonl: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]


def summary(results: list[dict[str, Any]]) -> str:
    lines = ["", "==== gpu_check summary ===="]
    for r in results:
        body = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.items()) if k != "section")
        lines.append(f"{r['section']:>10}: {body}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- sections (need torch)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def section_peak() -> float:
    sys.path.insert(0, str(HERE))
    import common

    flops = common.matmul_flops(8192, seconds=5.0, dtype="bfloat16", device="cuda")
    print(result_line("peak", bf16_matmul_tflops=round(flops / 1e12, 1)), flush=True)
    return flops


def _recipe(work: Path, arch: dict, steps: int, precision: str, extra: dict | None = None, seq: int = 1024,
            batch: int = 8, compile_: bool = False) -> Path:  # fmt: skip
    sys.path.insert(0, str(HERE))
    import common

    text = work / "corpus.txt"
    if not text.exists():
        lines = [*common.wikitext_lines("test"), *common.wikitext_lines("valid")]
        text.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    tok = common.bench_tokenizer(vocab_for(arch))
    body = {
        "name": "gpucheck",
        "seed": 0,
        "stages": {
            "pre": {
                "kind": "pretrain",
                "objective": "clm",
                "tokenizer": str(tok),
                "model": arch,
                "data": {"files": [str(text)]},
                "validation_fraction": 0.01,
                "max_seq_len": seq,
                "train": {
                    "max_steps": steps,
                    "batch_size": batch,
                    "precision": precision,
                    "lr": 3.0e-4,
                    "warmup_steps": 5,
                    "log_every_steps": 1,
                    "save_every_steps": max(2, steps // 3),
                    "keep_checkpoints": 2,
                    "eval_every_steps": 10**6,
                    "compile": compile_,
                },  # fmt: skip
            }
        },
        **(extra or {}),
    }
    digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    recipe = work / f"recipe-{digest}.yaml"
    recipe.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return recipe


def _mlsteps(args: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlsteps", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _env(work: Path) -> dict[str, str]:
    return dict(os.environ, MLSTEPS_CACHE=str(work / "cache"),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip


def plain_loop(blocks_dir: Path, arch: dict, steps: int, *, attn: str, compile_: bool,
               device: str, dtype: str) -> float:  # fmt: skip
    """Tokens/s of a hand-written loop on the stage's packed blocks (steps after warm-up)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlsteps.stages.pretrain.lm_data import CausalCollator
    from mlsteps.stages.pretrain.packing import PackedBlocks

    sys.path.insert(0, str(HERE))
    import common
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(common.bench_tokenizer(vocab_for(arch)))
    config = GPT2Config(vocab_size=len(tok), n_positions=arch["max_positions"], n_embd=arch["hidden_size"],
                        n_layer=arch["n_layers"], n_head=arch["n_heads"], attn_implementation=attn)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    run = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    blocks = PackedBlocks(blocks_dir)
    loader = torch.utils.data.DataLoader(blocks, batch_size=8, shuffle=True, drop_last=True,
                                         collate_fn=CausalCollator(tok.pad_token_id))  # fmt: skip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    tokens, started, it = 0, 0.0, iter(loader)
    for step in range(steps):
        if step == 10:
            sync()
            started, tokens = time.perf_counter(), 0
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp:
            loss = run(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    sync()
    return tokens / (time.perf_counter() - started)


def section_pretrain(work: Path, steps: int, peak: float, *, cpu: bool) -> Path | None:
    sys.path.insert(0, str(HERE))
    import common

    arch, precision, device = (TINY, "fp32", "cpu") if cpu else (GPT2_124M, "bf16", "cuda")
    seq = 64 if cpu else 1024
    env = _env(work)
    first: Path | None = None
    stage_rates = {}
    compiles = (False,) if cpu else (False, True)  # torch.compile on a CPU: minutes of C++ builds
    for compile_ in compiles:
        run_dir = work / f"run-pre-compile{int(compile_)}"
        recipe = _recipe(work, arch, steps, precision, seq=seq, compile_=compile_)
        res = _mlsteps(["run", str(recipe), "--run-dir", str(run_dir)], work, env)
        if res.returncode != 0:
            print(
                result_line(
                    "pretrain", error=f"mlsteps run exit {res.returncode}", compile=compile_
                )
            )
            print(res.stderr[-3000:], file=sys.stderr)
            continue
        first = first or run_dir
        stage_rates[compile_] = json.loads((run_dir / "metrics.json").read_text())["pre"][
            "tokens_per_s"
        ]
    entries = sorted((work / "cache" / "packed").glob("[0-9a-f]*"), key=lambda p: p.stat().st_size)
    if not entries:
        return first
    blocks = entries[-1]  # the training blocks (the validation set is the smaller entry)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(common.bench_tokenizer(vocab_for(arch))))
    n_params = 12 * arch["n_layers"] * arch["hidden_size"] ** 2 + vocab * arch["hidden_size"]
    fpt = common.flops_per_token(n_params, arch["n_layers"], arch["hidden_size"], seq)
    for compile_ in compiles:
        for attn in ("eager", "sdpa"):
            try:
                plain = plain_loop(blocks, arch, steps, attn=attn, compile_=compile_,
                                   device=device, dtype=precision)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
                print(result_line("pretrain", attn=attn, compile=compile_, error=repr(exc)[:300]))
                continue
            stage = stage_rates.get(compile_)
            print(result_line(
                "pretrain", vocab=vocab, attn=attn, compile=compile_, plain_tokens_s=round(plain),
                stage_tokens_s=stage, stage_vs_plain=round(stage / plain, 3) if stage else None,
                stage_mfu=round(mfu(stage, fpt, peak), 3) if stage else None,
                plain_mfu=round(mfu(plain, fpt, peak), 3),
            ), flush=True)  # fmt: skip
    return first


def _kill_after_checkpoint(cmd: list[str], work: Path, env: dict[str, str], run_dir: Path) -> bool:
    """Start ``cmd``, kill -9 its process group once a checkpoint is COMPLETE; True if killed."""
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if list((run_dir / "pre" / "checkpoints").glob("checkpoint-*/COMPLETE")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.2)
    return False


def section_sharded(name: str, work: Path, steps: int, reference: Path | None) -> None:
    if name != "fsdp":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print(f"SKIP {name}: deepspeed is not installed (pip install deepspeed)", flush=True)
            print(result_line(name, skipped="deepspeed not installed"))
            return
    import torch

    block = ({"fsdp": {"sharding": "full_shard"}} if name == "fsdp"
             else {"deepspeed": {"zero_stage": int(name[-1])}})  # fmt: skip
    recipe = _recipe(work, GPT2_124M, steps, "bf16", extra={"distributed": block})
    run_dir = work / f"run-{name}"
    env = _env(work)
    cmd = [sys.executable, "-m", "mlsteps", "run", str(recipe), "--run-dir", str(run_dir),
           "--nproc-per-node", str(max(1, torch.cuda.device_count()))]  # fmt: skip
    killed = _kill_after_checkpoint(cmd, work, env, run_dir)
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    values: dict[str, Any] = {"killed_after_checkpoint": killed, "rerun_exit": res.returncode}
    if res.returncode == 0:
        values["resumed"] = "resum" in res.stderr.lower()
        if reference is not None:
            ok, worst = curves_match(loss_curve(run_dir / "pre" / "metrics.jsonl"),
                                     loss_curve(reference / "pre" / "metrics.jsonl"))  # fmt: skip
            values.update(curve_matches_plain=ok, max_loss_diff=round(worst, 4))
    else:
        print(res.stderr[-3000:], file=sys.stderr)
    print(result_line(name, **values), flush=True)


def section_qlora(steps: int) -> None:
    try:
        import bitsandbytes  # noqa: F401
        import peft
    except ImportError as exc:
        print(f"SKIP qlora: {exc.name} is not installed", flush=True)
        print(result_line("qlora", skipped=f"{exc.name} not installed"))
        return
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    # ~0.5B: 24 layers x 1024 wide, 2816 MLP, 32000 vocab (Qwen2.5-0.5B / TinyLlama-like shape).
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=1024)  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="gpucheck-llama-"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for mode in ("bf16", "4bit"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
                 if mode == "4bit" else None)  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                 quantization_config=quant, device_map="cuda")  # fmt: skip
        if mode == "4bit":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(model, lora)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, 32000, (8, 512), device="cuda")
        tokens, started = 0, 0.0
        for step in range(steps):
            if step == 5:
                torch.cuda.synchronize()
                started, tokens = time.perf_counter(), 0
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += ids.numel()
        torch.cuda.synchronize()
        rate = tokens / (time.perf_counter() - started)
        print(result_line("qlora", mode=mode, tokens_s=round(rate),
                          peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3)),
              flush=True)  # fmt: skip
        del model, opt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summary(parse_results(Path(args.summarize).read_text(errors="replace"))))
        return 0
    work = Path(args.out or tempfile.mkdtemp(prefix="mlsteps-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cuda = has_cuda()
    print(
        f"gpu_check: work dir {work}; CUDA {'available' if cuda else 'not available'}", flush=True
    )
    peak, reference = 0.0, None
    for section in args.sections:
        if time.monotonic() - started > args.budget_s:
            print(f"SKIP {section}: time budget of {args.budget_s} s used up", flush=True)
            continue
        if not cuda and not (args.cpu_smoke and section == "pretrain"):
            print(f"SKIP {section}: no CUDA device (run on a GPU machine)", flush=True)
            continue
        t0 = time.monotonic()
        try:
            if section == "peak":
                peak = section_peak()
            elif section == "pretrain":
                if not cuda:
                    sys.path.insert(0, str(HERE))
                    import common

                    peak = common.matmul_flops(512, seconds=1.0)
                reference = section_pretrain(work, args.steps, peak, cpu=not cuda)
            elif section in ("fsdp", "zero2", "zero3"):
                section_sharded(section, work, args.steps, reference)
            else:
                section_qlora(max(10, args.steps // 2))
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            print(result_line(section, error=repr(exc)[:500]), flush=True)
        print(f"({section}: {time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

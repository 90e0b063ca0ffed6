"""Pretraining data larger than memory (issue 19): memory, tokenise+pack speed, memmap training.

1. Peak memory of the real ``pretrain`` stage (``mlsteps run``, data preparation + the first
   steps) on 100 MB, 400 MB and 1.6 GB of text, each in its own subprocess with an empty packed
   cache. The text is generated here from ../shared/data (wikitext-2 test+valid lines, each
   repetition shuffled with a fixed seed) under /tmp, never committed. Reported: peak RSS
   (VmHWM: includes file pages of memory-mapped files, which the kernel can drop) and peak
   anonymous RSS (RssAnon, sampled: the memory that cannot be reclaimed). Target: growth from
   the smallest to the largest size <= 15%.
2. Tokenise + pack MB/s (``stages.pretrain.packing.pack_corpus``, fresh cache) against the tokenizers
   library's own parallel ``encode_batch`` on the same text (pre-read, same batches, same
   tokenizer), and ``datasets.map(num_proc=N)`` with the same tokenizer (which of the two ways
   to use every core is faster; docs/scale.md). Target: pack >= 0.9x encode_batch.
3. Training tokens/s of one model on the packed blocks read memory-mapped vs loaded in memory
   (``PackedBlocks(in_memory=True)``), interleaved step by step in one process, medians of the
   per-step times (``train_speed``). Target: >= 0.97x.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORK = Path("/tmp/mlsteps-scale-bench")


def make_text(mb: int) -> Path:
    """``mb`` MiB of text: shared-data lines, every repetition shuffled (seeded)."""
    out = WORK / f"text-{mb}MB.txt"
    if out.exists() and out.stat().st_size >= mb * 2**20:
        return out
    # English only: the bench tokenizer is a BPE trained on wikitext-2.
    lines = [*common.wikitext_lines("test"), *common.wikitext_lines("valid")]
    rng = random.Random(0)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while written < mb * 2**20:
            rng.shuffle(lines)
            chunk = "\n".join(lines) + "\n"
            fh.write(chunk)
            written += len(chunk.encode())
    os.replace(tmp, out)
    return out


class ProcSampler:
    """Peak VmRSS / RssAnon / RssFile of one process (from /proc, every ``interval`` s)."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: v / 1024 for k, v in self.peak.items()}  # MiB


RECIPE = """\
name: scale-bench
seed: 0
stages:
  pre:
    kind: pretrain
    objective: clm
    tokenizer: {tok}
    model: {{family: gpt2, n_layers: 2, hidden_size: 64, n_heads: 2, max_positions: 128}}
    data: {{files: [{text}]}}
    validation: {{files: [{val}]}}
    max_seq_len: 128
    train: {{max_steps: {steps}, batch_size: 8, precision: fp32, log_every_steps: 1,
             save_every_steps: 1000, warmup_steps: 0}}
"""


def rss_of_stage(mb: int, tok: Path, steps: int) -> dict[str, Any]:
    text = make_text(mb)
    val = WORK / "val.txt"
    val.write_text("\n".join(common.wikitext_lines("test")[:300]) + "\n", encoding="utf-8")
    run_dir, cache = WORK / f"run-{mb}", WORK / f"cache-{mb}"
    for p in (run_dir, cache):
        shutil.rmtree(p, ignore_errors=True)
    recipe = WORK / f"recipe-{mb}.yaml"
    recipe.write_text(RECIPE.format(tok=tok, text=text, val=val, steps=steps), encoding="utf-8")
    env = dict(os.environ, MLSTEPS_CACHE=str(cache), PYTHONPATH=str(common.REPO))
    env.pop("TOKENIZERS_PARALLELISM", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [common.PY, "-m", "mlsteps", "run", str(recipe), "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = ProcSampler(proc.pid)
    _, err = proc.communicate()
    peak = sampler.stop()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pretrain on {mb} MB failed:\n{err[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())["pre"]
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "mb": mb,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak["VmHWM"] or peak["VmRSS"], 1),
        "peak_anon_mb": round(peak["RssAnon"], 1),
        "peak_file_mb": round(peak["RssFile"], 1),
        "train_tokens": metrics["train_tokens_per_epoch"],
    }


def throughput(mb: int, tok_dir: Path, reps: int, num_proc: int) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # encode_batch on every core
    os.environ["MLSTEPS_CACHE"] = str(WORK / "cache-throughput")
    from transformers import AutoTokenizer

    from mlsteps.engine.data import TEXT_COLUMN, load_text
    from mlsteps.recipe.specs.data import DataSpec
    from mlsteps.stages.pretrain import packing

    text = make_text(mb)
    size_mb = text.stat().st_size / 2**20
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = load_text(
        [DataSpec(files=[str(text)])],
        ["text"],
        data_field="b",
        column_field="b",
        cache_dir=WORK / "hf",
    )
    batches = [b[TEXT_COLUMN] for b in ds.iter(batch_size=packing.SHARD_DOCS)]
    backend = tok.backend_tokenizer
    pack_s, raw_s = [], []
    blocks = None
    for _ in range(reps):
        shutil.rmtree(WORK / "cache-throughput", ignore_errors=True)
        t0 = time.perf_counter()
        blocks = packing.pack_corpus(
            ds, tok, TEXT_COLUMN, end_id=tok.eos_token_id, block_len=128,
            keep_remainder=False, wrap=None,
        )  # fmt: skip
        pack_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for texts in batches:
            backend.encode_batch([t for t in texts if t], add_special_tokens=False)
        raw_s.append(time.perf_counter() - t0)
        common.log(f"pack {pack_s[-1]:.1f}s, encode_batch {raw_s[-1]:.1f}s")
    del batches

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return {
            "input_ids": tok([t for t in batch[TEXT_COLUMN] if t], add_special_tokens=False)[
                "input_ids"
            ]
        }

    map_s = {}
    for procs in (None, num_proc):
        t0 = time.perf_counter()
        ds.map(encode, batched=True, batch_size=packing.SHARD_DOCS, num_proc=procs,
               remove_columns=[TEXT_COLUMN], load_from_cache_file=False,
               cache_file_name=str(WORK / "hf" / f"map-{procs}.arrow"))  # fmt: skip
        map_s[procs or 1] = time.perf_counter() - t0
        common.log(f"datasets.map num_proc={procs}: {map_s[procs or 1]:.1f}s")
    assert blocks is not None
    return {
        "text_mb": round(size_mb, 1),
        "pack_mb_s": round(size_mb / common.median(pack_s), 2),
        "encode_batch_mb_s": round(size_mb / common.median(raw_s), 2),
        "pack_vs_encode_batch": round(common.median(raw_s) / common.median(pack_s), 3),
        "datasets_map_1proc_mb_s": round(size_mb / map_s[1], 2),
        f"datasets_map_{num_proc}proc_mb_s": round(size_mb / map_s[num_proc], 2),
        "blocks_path": str(blocks.path),
    }


def train_speed(blocks_path: Path, steps: int, reps: int) -> dict[str, Any]:
    """Tokens/s of training on memory-mapped vs in-memory blocks, interleaved step by step.

    One model, one process, two loaders (same shuffle seed): steps alternate between the two
    sources (ABAB..., the order flipped every pair), so a change in machine load hits both
    alike. Each step is timed from fetching its batch to the optimizer step; the ratio is of
    the medians of the per-step times, over ``reps`` x ``steps`` steps per source. The data
    path alone (no model) is timed the same way."""
    import torch
    from transformers import AutoTokenizer

    from mlsteps.engine.modeling import build_model
    from mlsteps.stages.pretrain.lm_data import CausalCollator
    from mlsteps.stages.pretrain.packing import PackedBlocks

    tok = AutoTokenizer.from_pretrained(common.bench_tokenizer())
    modes = ("memmap", "in_memory")

    def loaders(seed: int) -> dict[str, Any]:
        return {
            mode: iter(torch.utils.data.DataLoader(
                PackedBlocks(blocks_path, in_memory=mode == "in_memory"), batch_size=8,
                shuffle=True, collate_fn=CausalCollator(tok.pad_token_id),
                generator=torch.Generator().manual_seed(seed),
            ))
            for mode in modes
        }  # fmt: skip

    step_s: dict[str, list[float]] = {m: [] for m in modes}
    tokens = 0
    for rep in range(reps):
        torch.manual_seed(0)
        model = build_model(common.gpt2_arch(2, 128, 2, 128), tok, "clm")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        its = loaders(rep)
        for step in range(2 * (steps + 2)):
            pair, first = divmod(step, 2)
            mode = modes[first ^ (pair % 2)]
            t0 = time.perf_counter()
            batch = next(its[mode])
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if pair >= 2:  # warm-up pairs done
                step_s[mode].append(time.perf_counter() - t0)
                tokens = int(batch["attention_mask"].sum())
        common.log(
            f"train rep {rep}: memmap {common.median(step_s['memmap']) * 1000:.1f} ms/step, "
            f"in-memory {common.median(step_s['in_memory']) * 1000:.1f} ms/step"
        )
    # The data path alone (no model): what memory mapping can cost a step at most.
    fetch_s: dict[str, list[float]] = {m: [] for m in modes}
    its = loaders(99)
    for step in range(2 * 600):
        mode = modes[(step % 2) ^ ((step // 2) % 2)]
        t0 = time.perf_counter()
        next(its[mode])
        fetch_s[mode].append(time.perf_counter() - t0)
    mm, mem = common.median(step_s["memmap"]), common.median(step_s["in_memory"])
    return {
        "steps_per_source": len(step_s["memmap"]),
        "ms_per_step": {"memmap": round(mm * 1000, 2), "in_memory": round(mem * 1000, 2)},
        "loader_ms_per_batch": {k: round(common.median(v) * 1000, 3) for k, v in fetch_s.items()},
        "memmap_tokens_s": round(tokens / mm),
        "in_memory_tokens_s": round(tokens / mem),
        "memmap_vs_in_memory": round(mem / mm, 3),
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,400,1600", help="MiB of text for the memory runs")
    p.add_argument("--throughput-mb", type=int, default=100)
    p.add_argument("--steps", type=int, default=5, help="training steps of the memory runs")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 2)
    p.add_argument("--skip", default="", help="comma list of: rss, throughput, train")
    p.add_argument("--blocks", default=None, help="train speed on this packed entry (no packing)")
    args = p.parse_args()
    sizes = [5, 20] if args.quick else [int(s) for s in args.sizes.split(",")]
    tput_mb = 5 if args.quick else args.throughput_mb
    common.setup_threads(args.threads)
    tok = common.bench_tokenizer()
    skip = set(args.skip.split(","))
    result: dict[str, Any] = {"load_average_start": os.getloadavg()}
    if "throughput" not in skip:
        result["throughput"] = throughput(
            tput_mb, tok, 1 if args.quick else args.reps, args.num_proc
        )
        print(json.dumps(result["throughput"]), flush=True)
    blocks = args.blocks or result.get("throughput", {}).get("blocks_path")
    if "train" not in skip and blocks:
        steps, reps = (10, 1) if args.quick else (60, 3)
        result["train"] = train_speed(Path(blocks), steps, reps)
        print(json.dumps(result["train"]), flush=True)
    if "rss" not in skip:
        result["rss"] = []
        for mb in sizes:
            result["rss"].append(rss_of_stage(mb, tok, args.steps))
            print(json.dumps(result["rss"][-1]), flush=True)
        first, last = result["rss"][0], result["rss"][-1]
        result["rss_growth"] = round(last["peak_rss_mb"] / first["peak_rss_mb"] - 1, 3)
        result["anon_growth"] = round(last["peak_anon_mb"] / first["peak_anon_mb"] - 1, 3)
    result["load_average_end"] = os.getloadavg()
    rows = [
        [
            r["mb"],
            r["seconds"],
            r["peak_rss_mb"],
            r["peak_anon_mb"],
            r["peak_file_mb"],
            r["train_tokens"],
        ]
        for r in result.get("rss", [])
    ]
    md = (
        ""
        if not rows
        else common.table(
            ["text MB", "s", "peak RSS MB", "peak anon MB", "peak file MB", "tokens"], rows
        )
    )
    md += (
        "\n\n```\n"
        + json.dumps({k: v for k, v in result.items() if k != "rss"}, indent=1)
        + "\n```\n"
    )
    print(md)
    headline = {k: result.get(k) for k in ("rss_growth", "anon_growth")}
    headline.update(
        {
            k: result.get("throughput", {}).get("pack_vs_encode_batch")
            for k in ["pack_vs_encode_batch"]
        }
    )
    headline["memmap_vs_in_memory"] = result.get("train", {}).get("memmap_vs_in_memory")
    common.write_results("scale_data", quick=args.quick, result=result, markdown=md,
                         headline=headline, no_write=args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()

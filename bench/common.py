"""Shared helpers of the benchmarks: timing, medians, result files, peak memory, matmul rate.

Every bench script writes ``bench/results/<name>.json`` (the latest run, plus a short history of
headline numbers) and ``bench/results/<name>.md`` (the latest table, then the history). Nothing
here fails on a slow result: a benchmark reports, it does not judge.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # ../shared/data from the repository root
RESULTS = REPO / "bench" / "results"
CACHE = Path(tempfile.gettempdir()) / "mlsteps-bench-cache"
PY = sys.executable
HISTORY_KEEP = 20


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke run (small sizes, few reps)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch results/")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own, or 1 when the load average exceeds "
        "the CPU count: on an oversubscribed CPU, OpenMP threads wait on each other and every "
        "kernel gets many times slower)",
    )
    return p


THREADS_NOTE: dict[str, Any] = {}


def setup_threads(requested: int | None) -> int:
    """Apply ``--threads``; returns the thread count used (also recorded by write_results)."""
    import torch

    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if requested is None and load > cpus:
        requested = 1
        log(f"load average {load:.1f} > {cpus} CPUs: using 1 torch thread (--threads to override)")
    if requested:
        torch.set_num_threads(requested)
    THREADS_NOTE.update(threads=torch.get_num_threads(), load_average=round(load, 1), cpus=cpus)
    return torch.get_num_threads()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


# ---------------------------------------------------------------- timing


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["s"]`` holds the elapsed seconds."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def time_subprocess(
    argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> float:
    return time_subprocess_cpu(argv, cwd=cwd, env=env)[0]


def time_subprocess_cpu(
    argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one subprocess run. CPU time barely depends on
    what else the machine runs, so it is the steadier number on a shared box."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def interleave(
    runs: dict[str, Callable[[], float]], reps: int, *, warmup: int = 0
) -> dict[str, list[float]]:
    """Call each function in turn (A, B, C, A, B, C ...) ``reps`` times; returns the values."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for key, fn in runs.items():
            out[key].append(fn())
    return out


# ---------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Polls the RSS of a process and all its children (psutil) in a background thread.

    ``peak_mb`` is the largest sum seen; ``baseline_mb`` the value when sampling started, so
    ``peak_mb - baseline_mb`` is what a code section added on top of what was already there.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.05):
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.baseline_mb = self._sample()
        self.peak_mb = self.baseline_mb

    def _sample(self) -> float:
        import psutil

        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            return 0.0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._sample())


# ---------------------------------------------------------------- probing a training stage


@dataclass
class Probe:
    """What ``stage_probe`` saw: ``(perf_counter, real tokens so far, padded tokens so far,
    record, process CPU seconds)`` for every metrics.jsonl record, in order."""

    records: list[tuple[float, int, int, dict[str, Any], float]] = field(default_factory=list)
    real: int = 0
    padded: int = 0

    def steady(self) -> dict[str, float]:
        """Rates between the first and the last training log record (warm-up excluded)."""
        logs = [r for r in self.records if r[3].get("loss") is not None]
        (t0, real0, pad0, r0, c0), (t1, real1, pad1, r1, c1) = logs[0], logs[-1]
        own = [r[3]["tokens_per_s"] for r in logs[1:] if r[3].get("tokens_per_s")]
        return {
            "real_tokens_per_s": (real1 - real0) / (t1 - t0),
            "real_tokens_per_cpu_s": (real1 - real0) / max(1e-9, c1 - c0),
            "padded_tokens_per_s": (pad1 - pad0) / (t1 - t0),
            "pad_fraction": 1 - (real1 - real0) / max(1, pad1 - pad0),
            "steps_per_s": (r1["step"] - r0["step"]) / (t1 - t0),
            "timed_steps": r1["step"] - r0["step"],
            "final_loss": float(r1["loss"]),
            "self_reported_tokens_per_s": median(own),
        }


@contextmanager
def stage_probe() -> Iterator[Probe]:
    """Time-stamp every metrics.jsonl record a training stage writes and count the real
    (attention-mask) and padded tokens of every training batch, by wrapping mlsteps' own
    writer and token counter; what they do is unchanged. Follows the module layout of
    ``mlsteps.engine`` (``train_callbacks.JsonlWriter``/``count_tokens`` or older names)."""
    from mlsteps.engine import training

    try:
        from mlsteps.engine import train_callbacks as cb

        writer_cls: Any = cb.JsonlWriter
    except ImportError:
        writer_cls = training._JsonlWriter  # type: ignore[attr-defined]
    count_name = "count_tokens" if hasattr(training, "count_tokens") else "_count_tokens"
    write, count = writer_cls.write, getattr(training, count_name)
    probe = Probe()

    def stamped(self: Any, record: dict[str, Any]) -> None:
        write(self, record)
        probe.records.append(
            (time.perf_counter(), probe.real, probe.padded, dict(record), time.process_time())
        )

    def counting(inputs: dict[str, Any]) -> int:
        n = int(count(inputs))
        probe.real += n
        ids = inputs.get("input_ids")
        probe.padded += int(ids.numel()) if ids is not None else n
        return n

    writer_cls.write = stamped
    setattr(training, count_name, counting)
    try:
        yield probe
    finally:
        writer_cls.write = write
        setattr(training, count_name, count)


# ---------------------------------------------------------------- compute rate


def matmul_flops(
    n: int = 1024, seconds: float = 2.0, dtype: str = "float32", device: str = "cpu"
) -> float:
    """Measured dense matmul rate (FLOP/s) of ``n x n`` products: the machine's practical peak.

    The best of a few timed bursts (other processes share the CPU): 2·n³ FLOPs per product.
    """
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, dtype=dt, device=device)
    b = torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 5
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, reps * 2 * n**3 / elapsed)
    return best


def flops_per_token(n_params: int, layers: int, width: int, seq: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·d·seq (N: see ``compute_params``)."""
    return 6.0 * n_params + 12.0 * layers * width * seq


# ---------------------------------------------------------------- tables and result files


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return "" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable in a terminal)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    """'met', or how far off: '62% of target' (higher is better) / '2.5x target' (lower)."""
    if value != value:
        return "n/a"
    if higher_is_better:
        return "met" if value >= target else f"missed: {value / target:.0%} of target"
    return "met" if value <= target else f"missed: {value / target:.1f}x target"


def write_results(
    name: str,
    *,
    quick: bool,
    result: dict[str, Any],
    markdown: str,
    headline: dict[str, Any],
    no_write: bool = False,
) -> None:
    """Write results/<name>.json and refresh results/<name>.md (latest table + history)."""
    if no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    history: list[dict[str, Any]] = []
    if json_path.exists():
        try:
            history = list(json.loads(json_path.read_text()).get("history", []))
        except (ValueError, AttributeError):
            history = []
    stamp = now_iso()
    history = [*history, {"at": stamp, "quick": quick, **headline}][-HISTORY_KEEP:]
    payload = {
        "name": name,
        "at": stamp,
        "quick": quick,
        "machine": {**machine(), **THREADS_NOTE},
        **result,
        "history": history,
    }
    _atomic_write(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    keys = sorted({k for h in history for k in h if k not in ("at", "quick")})
    hist_rows = [
        [h["at"], "quick" if h.get("quick") else "full", *(h.get(k) for k in keys)] for h in history
    ]
    env = (
        f"Machine: {machine().get('cpu_model', '?')}, {os.cpu_count()} CPUs"
        + (
            f", {THREADS_NOTE['threads']} torch thread(s), load average "
            f"{THREADS_NOTE['load_average']} at the start"
            if THREADS_NOTE
            else ""
        )
        + ".\n\n"
    )
    md = (
        f"# bench/{name}.py — {stamp} ({'quick' if quick else 'full'} mode)\n\n{env}"
        f"{markdown.strip()}\n\n## History (headline numbers, newest last)\n\n"
        f"{table(['at', 'mode', *keys], hist_rows)}\n"
    )
    _atomic_write(md_path, md)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- data and tokenizer


def wikitext_lines(split: str = "valid") -> list[str]:
    path = DATA / "wikitext-2" / f"{split}.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def labelled_rows(dataset: str, split: str, column: str) -> list[tuple[str, int]]:
    """(text, integer label) of every row of a shared TSV set, ``<dataset>/<split>.tsv``."""
    with open(DATA / dataset / f"{split}.tsv", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row[column], int(row["label"])) for row in reader]


def bench_tokenizer(vocab_size: int = 8000) -> Path:
    """A byte-level BPE tokenizer trained on wikitext-2 valid (cached in the temp dir).

    Built with the ``tokenizers`` library directly (GPT-2 style, bos/eos/pad/unk specials) and
    saved as a ``PreTrainedTokenizerFast`` directory, loadable by ``AutoTokenizer``.
    """
    out = CACHE / f"tokenizer-bpe-{vocab_size}"
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(wikitext_lines("valid"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
    fast.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(tmp, out)
    return out


def gpt2_arch(layers: int = 4, width: int = 256, heads: int = 4, positions: int = 256) -> Any:
    from mlsteps.recipe.specs.model import ArchSpec

    return ArchSpec(
        family="gpt2", n_layers=layers, hidden_size=width, n_heads=heads, max_positions=positions
    )


def compute_params(model: Any) -> int:
    """Parameters that cost matmul FLOPs per token: every unique parameter except the position
    table. A tied input embedding is kept: the LM head multiplies by it (2·d·V FLOPs a token)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        total -= wpe.weight.numel()
    return total


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""Perplexity evaluation: mlsteps.metrics.perplexity.causal_lm_perplexity vs a plain batched
forward pass over the same tokens (same windows, same batch size, one vectorised loss per
batch), in both modes of the metric: ``stream`` (rows joined with EOS, full 256-token windows)
and ``document`` (each row its own sequence; the eval stage's default). Runs alternate; median of
N each; the two NLL sums are compared. Target: mlsteps >= 0.95x the plain pass's tokens/s.

    .venv/bin/python bench/perplexity.py [--quick] [--lines N] [--reps N]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = 0.95


def plain_stream(
    model: Any, tok: Any, texts: list[str], window: int, batch: int
) -> tuple[float, int]:
    """[BOS] row EOS row ...; the same windows as the metric (the last one full width, its
    overlap context only); separators are context, not scored; one loss per batch."""
    import torch
    import torch.nn.functional as F

    seq, scorable = [tok.bos_token_id], [True]
    for k, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
        if k:
            seq.append(tok.eos_token_id)
            scorable.append(False)
        seq += ids
        scorable += [True] * len(ids)
    ids_t, ok = torch.tensor(seq), torch.tensor(scorable)
    n = len(seq)
    width = min(window, n - 1)
    wins = [(start, first) for start, first, _ in metric_windows(n, window)]
    positions = torch.arange(width)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            group = wins[i : i + batch]
            x = torch.stack([ids_t[s : s + width] for s, _ in group])
            y = torch.stack([ids_t[s + 1 : s + 1 + width] for s, _ in group])
            keep = torch.stack(
                [ok[s + 1 : s + 1 + width] & (positions + s + 1 >= first) for s, first in group]
            )
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            nll += float(loss[keep.flatten()].double().sum())
            count += int(keep.sum())
    return nll, count


def metric_windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """(start, first scored target, end) of each window over n tokens, as the metric cuts them."""
    out, t0, t1 = [], 1, min(1 + window, n)
    while t0 < n:
        out.append((max(0, t1 - 1 - window), t0, t1))
        t0, t1 = t1, min(t1 + window, n)
    return out


def plain_document(
    model: Any, tok: Any, texts: list[str], window: int, batch: int
) -> tuple[float, int]:
    """Each row [BOS] + ids, the metric's windows; length-sorted batches, right padding, one
    vectorised loss per batch (unscored and padded targets are -100)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        seq = [tok.bos_token_id, *ids]
        for start, first, end in metric_windows(len(seq), window):
            targets = [
                t if k + start + 1 >= first else -100 for k, t in enumerate(seq[start + 1 : end])
            ]
            rows.append((seq[start : end - 1], targets))
    rows.sort(key=lambda r: len(r[0]), reverse=True)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            group = rows[i : i + batch]
            width = len(group[0][0])
            x = torch.full((len(group), width), tok.pad_token_id)
            y = torch.full((len(group), width), -100)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, (inp, tgt) in enumerate(group):
                x[r, : len(inp)] = torch.tensor(inp)
                y[r, : len(inp)] = torch.tensor(tgt)
                mask[r, : len(inp)] = 1
            logits = model(input_ids=x, attention_mask=mask).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            nll += float(loss.double())
            count += int((y != -100).sum())
    return nll, count


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=None, help="wikitext-2 test lines (default 400)")
    p.add_argument("--reps", type=int, default=None, help="runs per implementation (default 3)")
    p.add_argument("--model", default=None, help="LAYERSxWIDTH (default 4x256, quick 2x128)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    n_lines = args.lines or (60 if args.quick else 400)
    reps = args.reps or (1 if args.quick else 3)
    import torch

    from mlsteps.engine.modeling import build_model, load_tokenizer
    from mlsteps.metrics.perplexity import causal_lm_perplexity

    tok = load_tokenizer(str(common.bench_tokenizer(8000)))
    layers, width = map(int, (args.model or ("2x128" if args.quick else "4x256")).split("x"))
    torch.manual_seed(0)
    model = build_model(common.gpt2_arch(layers, width, max(1, width // 64), 256), tok, "clm")
    model.eval()
    texts = common.wikitext_lines("test")[:n_lines]
    window, batch = 256, 8
    results: dict[str, dict[str, Any]] = {}

    def mlsteps_run(mode: str) -> Any:
        res = causal_lm_perplexity(
            model,
            tok,
            texts,
            window_tokens=window,
            mode=mode,  # type: ignore[arg-type]
            batch_size=batch,
        )
        return res.nll_sum_nats, res.scored_tokens

    def timed(key: str, fn: Any) -> float:
        t0 = time.perf_counter()
        nll, count = fn()
        elapsed = time.perf_counter() - t0
        results.setdefault(key, {"times": [], "tokens": count, "nll": nll})["times"].append(elapsed)
        return elapsed

    runs = {
        "stream / mlsteps": lambda: timed("stream / mlsteps", lambda: mlsteps_run("stream")),
        "stream / plain": lambda: timed(
            "stream / plain", lambda: plain_stream(model, tok, texts, window, batch)
        ),
        "document / mlsteps": lambda: timed("document / mlsteps", lambda: mlsteps_run("document")),
        "document / plain": lambda: timed(
            "document / plain", lambda: plain_document(model, tok, texts, window, batch)
        ),
    }
    common.interleave(runs, reps, warmup=0 if args.quick else 1)
    rows, ratios = [], {}
    for key, r in results.items():
        times = r["times"][-reps:]
        r["tokens_per_s"] = r["tokens"] / common.median(times)
        rows.append(
            [
                key,
                r["tokens"],
                common.median(times),
                min(times),
                max(times),
                r["tokens_per_s"],
                math.exp(r["nll"] / r["tokens"]),
            ]
        )
    for mode in ("stream", "document"):
        a, b = results[f"{mode} / mlsteps"], results[f"{mode} / plain"]
        ratios[mode] = {
            "ratio": a["tokens_per_s"] / b["tokens_per_s"],
            "nll_rel_diff": abs(a["nll"] - b["nll"]) / b["nll"],
            "same_tokens": a["tokens"] == b["tokens"],
        }
    out = common.table(
        [
            "mode / implementation",
            "scored tokens",
            "median s",
            "min s",
            "max s",
            "tokens/s",
            "perplexity",
        ],
        rows,
    )
    head = (
        f"GPT-2 {layers} layers d={width} (random init), fp32, window {window}, stride "
        f"{window}, batch {batch}; wikitext-2 test, first {n_lines} non-blank lines; {reps} "
        f"alternating runs each{'' if args.quick else ' (after one warm-up round)'}."
    )
    verdict = " ".join(
        f"{m}: mlsteps/plain = {v['ratio']:.3f} (target >= {TARGET}: "
        f"{common.verdict(v['ratio'], TARGET)}); same scored tokens: {v['same_tokens']}, NLL "
        f"relative difference {v['nll_rel_diff']:.1e}."
        for m, v in ratios.items()
    )
    print(head + "\n\n" + out + "\n\n" + verdict)
    common.write_results(
        "perplexity",
        quick=args.quick,
        result={"lines": n_lines, "reps": reps, "results": results, "ratios": ratios},
        markdown=head + "\n\n" + out + "\n\n" + verdict,
        headline={f"ratio_{m}": round(v["ratio"], 3) for m, v in ratios.items()},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

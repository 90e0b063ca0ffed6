"""Verbalizer scoring: one forward pass per prompt (label words of one token each) vs one pass per
(prompt, label word) pair, the path every prompted classification took before; same model, same
prompts, label log-probabilities compared. Runs alternate; median of N each.

The workload is the low-label ladder's: SST-2 test sentences (all 872) in its 3-shot template
with demonstrations from the training split, the verbalizer "good"/"bad" (one token each with the
leading space), a 2-layer GPT-2 of width 64 (the ladder's CLM size) over the bench's byte-level
BPE, random weights (speed does not depend on them), batch 16, one torch thread by default.

    .venv/bin/python bench/prompt_scoring.py [--quick] [--reps N]
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEMPLATE = "Review: {sentence}\nSentiment:"
VERBALIZER = {"1": "good", "0": "bad"}


def _sst2(split: str) -> list[dict[str, str]]:
    with open(common.DATA / "sst2" / f"{split}.tsv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def prompts(n: int) -> list[str]:
    from mlsteps.prompt.prompter import Demonstration, Prompter

    train = _sst2("train")
    shown = [Demonstration(r["sentence"], VERBALIZER[r["label"]]) for r in train[:3]]
    prompter = Prompter(method="few_shot", template=TEMPLATE, task="classification",
                        verbalizer=VERBALIZER, demos=shown, shots=3)  # fmt: skip
    return [prompter.render({"sentence": r["sentence"]}) for r in _sst2("test")[:n]]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="runs per path (default 3, quick 1)")
    args = p.parse_args()
    common.setup_threads(args.threads or 1)
    import torch
    from transformers import AutoTokenizer

    from mlsteps.engine.modeling import build_model
    from mlsteps.prompt.scoring import continuation_logprobs, label_logprobs

    reps = args.reps or (1 if args.quick else 3)
    tok = AutoTokenizer.from_pretrained(common.bench_tokenizer())
    torch.manual_seed(0)
    model = build_model(common.gpt2_arch(2, 64, 2, 256), tok, "clm").eval()
    texts = prompts(64 if args.quick else 872)
    words = [" " + w for w in VERBALIZER.values()]
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    out: dict[str, Any] = {}

    def one_pass() -> float:
        start = time.perf_counter()
        out["one_pass"] = label_logprobs(model, tok, texts, VERBALIZER, answer_prefix=" ")
        return time.perf_counter() - start

    def pairs() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out["pairs"] = continuation_logprobs(
                model, tok, [t for t in texts for _ in words], words * len(texts)
            )
        return time.perf_counter() - start

    times = common.interleave({"pairs": pairs, "one_pass": one_pass}, reps, warmup=0)
    flat = [x for row in out["one_pass"] for x in row]
    diff = max(abs(a - b) for a, b in zip(flat, out["pairs"], strict=True))
    ratio = common.median(times["pairs"]) / common.median(times["one_pass"])
    rows = [[k, common.median(v), min(v), max(v)] for k, v in times.items()]
    table = common.table(["path", "median s", "min s", "max s"], rows)
    text = (
        f"{len(texts)} SST-2 3-shot prompts, 2 labels, batch 16, {reps} alternating runs each.\n\n"
        f"{table}\n\none pass per prompt: **{ratio:.2f}x** faster than the pair path; "
        f"largest difference of a label log-probability {diff:.2e}\n"
    )
    print(text)
    common.write_results(
        "prompt_scoring",
        quick=args.quick,
        result={
            "prompts": len(texts),
            "reps": reps,
            "times": times,
            "speedup": ratio,
            "max_abs_diff": diff,
        },  # fmt: skip
        markdown=text,
        headline={"speedup": round(ratio, 2), "max_abs_diff": diff},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

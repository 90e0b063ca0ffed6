"""Generation: mlsteps.engine.generation.generate batched (batch 32, length-sorted, left-padded)
vs one prompt at a time (a plain ``model.generate`` loop), greedy, fp32, same model and prompts;
outputs compared for equality. Runs alternate; median of N each. Target: batched >= 8x faster.

The model is the pretrain bench's GPT-2 (4 layers, d=256), briefly trained on wikitext-2 so that
greedy decoding is not a coin toss between near-equal logits; prompts are wikitext-2 test lines
cut to 4..48 words (varied lengths, so padding and sorting matter).

    .venv/bin/python bench/generation.py [--quick] [--prompts N] [--reps N]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = 8.0


def prompts(n: int) -> list[str]:
    lines = [x.strip() for x in common.wikitext_lines("test") if not x.strip().startswith("=")]
    out = []
    for i, line in enumerate(lines[:n]):
        words = line.split()
        out.append(" ".join(words[: 4 + (i * 7) % 45]))
    return out


def trained_model(tok: Any, layers: int, width: int, steps: int) -> Any:
    """The bench model after ``steps`` AdamW steps on wikitext-2 valid (cached on disk)."""
    import torch

    from mlsteps.engine.modeling import build_model

    path = common.CACHE / f"gen-model-{layers}x{width}-{steps}"
    if (path / "config.json").exists():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pretrain import packed_blocks

    torch.manual_seed(0)
    model = build_model(common.gpt2_arch(layers, width, max(1, width // 64), 256), tok, "clm")
    blocks = packed_blocks(tok, common.wikitext_lines("valid"), 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        x = blocks[order[step * 16 : step * 16 + 16]]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return model


def one_at_a_time(model: Any, tok: Any, inputs: list[str], max_new: int) -> list[str]:
    """The reference: each prompt alone through ``model.generate`` (greedy, KV cache)."""
    import torch

    out = []
    with torch.no_grad():
        for text in inputs:
            ids = tok(text, return_tensors="pt")["input_ids"]
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = gen[0, ids.shape[1] :].tolist()
            cut = next((k for k, t in enumerate(new) if t == tok.eos_token_id), len(new))
            out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
    return out


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=None, help="number of prompts (default 64)")
    p.add_argument("--max-new", type=int, default=None, help="new tokens (default 32)")
    p.add_argument("--reps", type=int, default=None, help="runs per implementation (default 3)")
    p.add_argument("--with-b1", action="store_true", help="also time mlsteps with batch_size=1")
    args = p.parse_args()
    common.setup_threads(args.threads)
    n = args.prompts or (32 if args.quick else 64)
    max_new = args.max_new or (12 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 3)
    import torch

    from mlsteps.engine.generation import generate
    from mlsteps.engine.modeling import ensure_pad_token, load_tokenizer
    from mlsteps.recipe.specs.model import GenerationSpec

    tok = load_tokenizer(str(common.bench_tokenizer(8000)))
    ensure_pad_token(tok)
    layers, width = (2, 128) if args.quick else (4, 256)
    model = trained_model(tok, layers, width, 15 if args.quick else 40)
    model.eval()
    inputs = prompts(n)
    lengths = [len(ids) for ids in tok(inputs)["input_ids"]]
    spec32 = GenerationSpec(max_new_tokens=max_new, batch_size=32)
    spec1 = GenerationSpec(max_new_tokens=max_new, batch_size=1)
    outputs: dict[str, list[str]] = {}

    def timed(key: str, fn: Any) -> float:
        t0 = time.perf_counter()
        outputs[key] = fn()
        return time.perf_counter() - t0

    runs = {
        "mlsteps batched (32)": lambda: timed(
            "b32", lambda: generate(model, tok, inputs, spec32, seed=0)
        ),
        "one at a time (model.generate loop)": lambda: timed(
            "one", lambda: one_at_a_time(model, tok, inputs, max_new)
        ),
    }
    if args.with_b1:
        runs["mlsteps batch_size=1"] = lambda: timed(
            "b1", lambda: generate(model, tok, inputs, spec1, seed=0)
        )
    torch.manual_seed(0)
    times = common.interleave(runs, reps)
    base = common.median(times["one at a time (model.generate loop)"])
    rows = [
        [k, common.median(v), min(v), max(v), base / common.median(v)] for k, v in times.items()
    ]
    out = common.table(["implementation", "median s", "min s", "max s", "speed-up"], rows)
    equal = sum(a == b for a, b in zip(outputs["b32"], outputs["one"], strict=True))
    equal_b1 = (
        sum(a == b for a, b in zip(outputs["b32"], outputs["b1"], strict=True))
        if "b1" in outputs
        else None
    )
    ratio = base / common.median(times["mlsteps batched (32)"])
    head = (
        f"GPT-2 {layers} layers d={width} (briefly trained on wikitext-2 valid), fp32 greedy, "
        f"{n} prompts of {min(lengths)}-{max(lengths)} tokens, max_new_tokens {max_new}, "
        f"{reps} alternating runs each, {torch.get_num_threads()} torch threads."
    )
    check = (
        f"Greedy outputs equal to one-at-a-time: {equal}/{n}"
        + (f"; batch 32 vs mlsteps batch 1: {equal_b1}/{n}" if equal_b1 is not None else "")
        + f". Speed-up batched vs one-at-a-time: {ratio:.2f}x, target >= {TARGET:g}x: "
        f"{common.verdict(ratio, TARGET)}."
    )
    print(head + "\n\n" + out + "\n\n" + check)
    diffs = [
        {"prompt": inputs[i], "batched": outputs["b32"][i], "one": outputs["one"][i]}
        for i in range(n)
        if outputs["b32"][i] != outputs["one"][i]
    ][:5]
    for d in diffs:
        print(f"  differs: {d}")
    common.write_results(
        "generation",
        quick=args.quick,
        result={
            "prompts": n,
            "max_new_tokens": max_new,
            "reps": reps,
            "times": times,
            "speedup": ratio,
            "equal": equal,
            "equal_b1": equal_b1,
            "diffs": diffs,
        },
        markdown=head + "\n\n" + out + "\n\n" + check,
        headline={"speedup": round(ratio, 2), "equal": f"{equal}/{n}"},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

"""Fine-tuning throughput on SST-2 classification: real (non-pad) tokens/s of the `finetune`
stage as shipped (dynamic padding + length-grouped batches) vs the same stage padding every
batch to one fixed length (the longest example of the data, so nothing is truncated) with random
batches. Target: >= 2x.

Both variants run the real stage through the runner. The fixed-length variant only swaps the
stage's collator for ``DataCollatorWithPadding(padding="max_length")`` and sets
``group_by_length: false``. Wrappers record a timestamp for every metrics.jsonl record and the
real/padded token counts of every training batch (the stage's own code is unchanged); tokens/s
counts the steps between the first and the last log record (warm-up and setup excluded).

    .venv/bin/python bench/finetune.py [--quick] [--steps N] [--reps N]
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = 2.0
VARIANTS = {
    "mlsteps: dynamic padding + group_by_length": ("dynamic", True),
    "pad every batch to max length, random batches": ("max_length", False),
    "dynamic padding, random batches": ("dynamic", False),
}


def run_stage(
    cfg: dict[str, Any], padding: str, grouped: bool, pad_to: int, workdir: Path, tok_dir: Path
) -> dict[str, float]:
    import mlsteps.stages.finetune.prepare as stage  # where the classification collator is built
    from mlsteps.recipe import validate_recipe
    from mlsteps.runner import run_recipe

    collator = stage.DataCollatorWithPadding
    raw = {
        "name": "bench-finetune",
        "seed": 0,
        "stages": {
            "ft": {
                "kind": "finetune",
                "task": "classification",
                "model": {
                    "family": "gpt2",
                    "n_layers": cfg["layers"],
                    "hidden_size": cfg["width"],
                    "n_heads": cfg["heads"],
                    "max_positions": 256,
                },
                "tokenizer": str(tok_dir),
                "data": {
                    "files": [str(common.DATA / "sst2" / "train.tsv")],
                    "max_samples": cfg["rows"],
                },
                "text_column": "sentence",
                "validation_fraction": 0.0,
                "max_seq_len": cfg["max_seq_len"],
                "train": {
                    "batch_size": cfg["batch"],
                    "max_steps": cfg["steps"],
                    "lr": 5e-4,
                    "precision": "fp32",
                    "log_every_steps": cfg["log_every"],
                    "save_every_steps": cfg["steps"] * 10,
                    "group_by_length": grouped,
                },
            }
        },
    }
    if padding == "max_length":
        stage.DataCollatorWithPadding = functools.partial(  # type: ignore[misc]
            collator, padding="max_length", max_length=pad_to
        )
    try:
        with common.stage_probe() as probe:
            run_recipe(validate_recipe(raw), Path(tempfile.mkdtemp(dir=workdir)), quiet=True)
    finally:
        stage.DataCollatorWithPadding = collator  # type: ignore[misc]
    return probe.steady()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40)")
    p.add_argument("--reps", type=int, default=None, help="runs per variant (default 3)")
    p.add_argument("--model", default=None, help="LAYERSxWIDTH (default 4x256, quick 2x128)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    layers, width = map(int, (args.model or ("2x128" if args.quick else "4x256")).split("x"))
    steps = args.steps or (8 if args.quick else 40)
    cfg = {
        "layers": layers,
        "width": width,
        "heads": max(1, width // 64),
        "batch": 32,
        "steps": steps,
        "log_every": 2 if args.quick else 5,
        "max_seq_len": 128,
        "rows": steps * 32,
    }
    reps = args.reps or (1 if args.quick else 3)
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    from mlsteps.engine.modeling import load_tokenizer

    tok_dir = common.bench_tokenizer(8000)
    tok = load_tokenizer(str(tok_dir))
    lines = (common.DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines[: cfg["rows"]]]
    lengths = [
        len(x) for x in tok(texts, truncation=True, max_length=cfg["max_seq_len"])["input_ids"]
    ]
    pad_to = max(lengths)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    runs = {
        name: (lambda pad=pad, grp=grp: run_stage(cfg, pad, grp, pad_to, work, tok_dir))
        for name, (pad, grp) in variants.items()
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for rep in range(reps):
        for name, fn in runs.items():
            results[name].append(fn())
            common.log(
                f"rep {rep + 1} {name}: {results[name][-1]['real_tokens_per_s']:.0f} real tok/s"
            )
    rows, summary = [], {}
    for name, rs in results.items():
        real = [r["real_tokens_per_s"] for r in rs]
        summary[name] = {k: common.median([r[k] for r in rs]) for k in rs[0]}
        rows.append(
            [
                name,
                common.median(real),
                min(real),
                max(real),
                summary[name]["padded_tokens_per_s"],
                summary[name]["pad_fraction"],
                summary[name]["steps_per_s"],
            ]
        )
    names = list(results)
    ratio = summary[names[0]]["real_tokens_per_s"] / summary[names[1]]["real_tokens_per_s"]
    out = common.table(
        ["variant", "real tok/s (median)", "min", "max", "padded tok/s", "pad fraction", "steps/s"],
        rows,
    )
    head = (
        f"SST-2 train.tsv, first {cfg['rows']} rows ({min(lengths)}-{max(lengths)} tokens, "
        f"mean {sum(lengths) / len(lengths):.1f}; fixed length = {pad_to}); GPT-2 "
        f"{cfg['layers']} layers d={cfg['width']} classifier from scratch, batch {cfg['batch']}, "
        f"fp32, {steps} steps per run, the first {cfg['log_every']} excluded; {reps} "
        f"alternating runs each."
    )
    verdict = (
        f"Real tokens/s, mlsteps vs fixed-length padding: {ratio:.2f}x; target >= "
        f"{TARGET:g}x: {common.verdict(ratio, TARGET)}."
    )
    print(head + "\n\n" + out + "\n\n" + verdict)
    common.write_results(
        "finetune",
        quick=args.quick,
        result={
            "config": cfg,
            "pad_to": pad_to,
            "summary": summary,
            "runs": results,
            "ratio": ratio,
        },
        markdown=head + "\n\n" + out + "\n\n" + verdict,
        headline={"ratio": round(ratio, 2)},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

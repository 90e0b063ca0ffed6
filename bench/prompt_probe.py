"""What the ladder's prompt methods would need: soft prompt tuning and calibrated few-shot
prompting of the ladder's CLM under changed settings, side by side, on the whole test split.

The ladder (bench/ladder.py) tunes 8 virtual tokens at lr 3e-2 for 160 steps on 300 rows of a
2-layer, 64-wide GPT-2 pretrained for 1,000 steps; on SST-2 that soft prompt scored below the
majority baseline. Each variant here changes one thing (the rate, the initial prompt, the
number of labelled rows and steps), and ``--pretrain WIDTHxSTEPS`` first pretrains a larger CLM
(the ladder's recipe with another width and step count, same BPE tokenizer) to put the same
methods on it. Everything runs as mlsteps recipes through ``python -m mlsteps run``.

    .venv/bin/python bench/prompt_probe.py --lang sst2 --pre RUN_DIR/ladder-pre [--seeds 1,2,3]
        [--pretrain 128x2000] [--variants base,lr0_3,init_text,rows1000]

``--pre``: the ladder's ``ladder-pre`` run directory (its tokenizers; ``--workdir`` of
bench/ladder.py, then ``<lang>/runs/ladder-pre``); the CLM is its sibling ``ladder-clm`` unless
``--pretrain`` trains another. Reports accuracy mean ± sample std over seeds and each
variant's difference to the majority baseline with its standard error.
"""

from __future__ import annotations

import resource
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ladder  # noqa: E402

# Label words as the initial soft prompt (Lester et al. 2021 found class-label initialisation
# the best of their three for small models).
INIT_TEXT = {"sst2": "good bad good bad", "zh_reviews": "好 差 好 差"}


def variants(name: str) -> dict[str, dict[str, Any]]:
    """Overrides of the ladder's prompt_tuning stage, by variant name."""
    soft = ladder.SOFT
    return {
        "base": {},
        "lr0_3": {"train": {**soft, "lr": 0.3}},
        "init_text": {"init_text": INIT_TEXT[name]},
        "tokens32": {"num_virtual_tokens": 32},
        "rows1000": {"rows": 1000, "train": {**soft, "max_steps": 480}},
    }


def seed_recipe(name: str, clm: str, seed: int, chosen: list[str], shots: int) -> dict[str, Any]:
    lang = ladder.LANGS[name]
    prompt = ladder.prompt_stage(lang, clm)
    stages: dict[str, Any] = {
        "few_shot_contextual": {
            **prompt,
            "method": "few_shot",
            "calibration": "contextual",
            "shots": shots,
            "data": ladder._data(lang, "train", shuffle_seed=seed, max_samples=300),
        }
    }
    for variant in chosen:
        over = dict(variants(name)[variant])
        rows = over.pop("rows", 300)
        data = ladder._data(lang, "train", shuffle_seed=seed, max_samples=rows)
        soft = over.pop("train", ladder.SOFT)
        stages[f"pt_{variant}"] = {**ladder.prompt_tuning_stage(lang, prompt, data, soft), **over}
    stages["test"] = ladder.eval_stage(lang, list(stages))
    return {"name": f"probe-s{seed}", "seed": seed, "stages": stages}


def _pretrain(name: str, pre: Path, spec: str, workdir: Path) -> tuple[str, dict[str, Any]]:
    width, steps = (int(x) for x in spec.split("x"))
    recipe = ladder.pretrain_recipe(ladder.LANGS[name], pre, "clm", steps)
    model = recipe["stages"]["clm"]["model"]
    model.update(hidden_size=width, n_heads=max(2, width // 32))
    recipe["name"] = f"probe-clm-{spec}"
    res = ladder.run_recipe(recipe, workdir)
    return str(Path(res["run_dir"]) / "clm" / "final"), {
        **res["metrics"]["clm"],
        "cpu_s": res["cpu_s"],
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lang", default="sst2", choices=list(ladder.LANGS))
    p.add_argument("--pre", required=True, help="the ladder's ladder-pre run directory")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--variants", default="base,lr0_3,init_text,rows1000")
    p.add_argument("--pretrain", default=None, help="WIDTHxSTEPS: pretrain a CLM of this size")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    pre, workdir = Path(args.pre).resolve(), Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = args.variants.split(",")
    clm, clm_metrics = str(pre.parent / "ladder-clm" / "clm" / "final"), {}
    if args.pretrain:
        common.log(f"[{args.lang}] pretraining a CLM {args.pretrain}")
        clm, clm_metrics = _pretrain(args.lang, pre, args.pretrain, workdir)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(
            lambda s: ladder.run_recipe(seed_recipe(args.lang, clm, s, chosen, args.shots), workdir),
            seeds,
        ))  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    table = [r["metrics"]["test"] for r in runs]
    rows = {m: {"accuracy": ladder.summarize([t[m]["accuracy"] for t in table])} for m in table[0]}
    lines = [
        f"# bench/prompt_probe.py --lang {args.lang} --pretrain {args.pretrain or '(the ladder CLM)'}",
        "",
        f"CLM: {clm}; validation perplexity {clm_metrics.get('val_perplexity', '(the ladder)')}"
        + (f", {clm_metrics['cpu_s'] / 60:.1f} CPU min pretraining" if clm_metrics else "")
        + f". Seeds {seeds}; {cpu / 60:.1f} CPU min for the prompt stages and the eval.",
        "",
        "| model | accuracy, mean ± std (min..max) | above the majority baseline (points ± std. error) |",
        "|---|---|---|",
    ]
    for model, row in rows.items():
        lines.append(
            f"| {model} | {ladder._cell(row)} | {ladder._diff(row, rows['majority_baseline'])} |"
        )
    text = "\n".join(lines)
    print(text)
    tag = f"{args.lang}_{args.pretrain or 'ladder'}"
    common.write_results(
        f"prompt_probe_{tag}",
        quick=args.quick,
        result={
            "rows": rows,
            "clm": clm_metrics,
            "cpu_s": cpu,
            "seeds": seeds,
            "variants": chosen,
            "soft": ladder.SOFT,
        },  # fmt: skip
        markdown=text,
        headline={m: round(r["accuracy"]["mean"], 3) for m, r in rows.items()},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

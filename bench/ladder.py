"""The low-label ladder on real data: does each step of mlsteps pay on text nobody wrote for it?

Per language (``sst2``: English SST-2, ``zh_reviews``: Chinese product/hotel reviews), with the
training split's text as the only unlabelled corpus, everything built as mlsteps recipes and run
through ``python -m mlsteps run`` (the bench measures the product):

1. ``pre`` recipe (once, seed 0): a WordPiece tokenizer + tiny modernbert pretrained with MLM, and a
   byte-level BPE tokenizer + tiny GPT-2 pretrained with CLM.
2. one recipe per seed: fine-tune classification on N labelled rows (N in ``--sizes``, a
   seed-dependent random subset of the training split) from the MLM model and from scratch
   (same architecture, same tokenizer); zero-shot and few-shot verbalizer prompting of the CLM
   model with each calibration (none, contextual, domain_pmi); soft prompt tuning of the CLM
   model through the verbalizer on N = ``--prompt-rows`` rows; one eval stage scoring all of
   them on the whole test split, plus the majority baseline (most frequent label of the test
   rows).

Reports mean and spread (sample standard deviation over seeds, and min..max) per method, the
gain of the MLM start and of each prompt method with its standard error,
CPU time (user+sys of the mlsteps processes, ``getrusage(RUSAGE_CHILDREN)``) and the wall time,
and plots accuracy against N into ``bench/results/ladder_<lang>.png``.

    .venv/bin/python bench/ladder.py [--lang sst2|zh_reviews|all] [--quick] [--seeds 1,2,3]
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LANGS: dict[str, dict[str, Any]] = {
    "sst2": {
        "dir": "sst2",
        "text": "sentence",
        "template": "Review: {sentence}\nSentiment:",
        "verbalizer": {"1": "good", "0": "bad"},
        "test": {"files": ["test.tsv"]},
        "seq": 64,
    },
    "zh_reviews": {
        "dir": "zh_reviews",
        "text": "text",
        "template": "评论：{text}\n评价：",
        "verbalizer": {"1": "好", "0": "差"},
        "test": {"files": ["test.tsv"]},
        "seq": 64,
    },
}
# Tiny models, sized so that one language fits in about 15 CPU minutes on this machine.
ARCH = {"n_layers": 2, "hidden_size": 64, "n_heads": 2, "max_positions": 256}
# The encoder family: a tiny bert sat on the MLM unigram plateau for the whole budget (250-800
# steps); modernbert (pre-norm, rotary positions, MLM head only at masked positions) leaves it
# within 400-600 steps at a third of bert's step cost (docs/quickstart.md).
ENCODER = "modernbert"
PRETRAIN_STEPS = {"mlm": 1600, "clm": 1000}
PRETRAIN_SEQ = 64
PRETRAIN = {"batch_size": 32, "weight_decay": 0.01}
PRETRAIN_BY_OBJECTIVE = {"mlm": {"lr": 3e-3, "warmup_steps": 100},
                         "clm": {"lr": 2e-3, "warmup_steps": 40}}  # fmt: skip
# The same optimisation for both starts (a lower rate only made the MLM start worse, see
# docs/quickstart.md).
FINETUNE = {"batch_size": 16, "warmup_steps": 10, "lr": 1e-3}
# Fine-tuning steps per N: about 8 epochs of the small sets, fewer passes of the large one.
FT_STEPS = {100: 60, 300: 150, 1000: 250}
SOFT = {"batch_size": 16, "lr": 3e-2, "warmup_steps": 10, "max_steps": 160}
CALIBRATIONS = ("none", "contextual", "domain_pmi")


def _data(lang: dict[str, Any], split: str, **extra: Any) -> dict[str, Any]:
    return {"files": [str(common.DATA / lang["dir"] / f"{split}.tsv")], **extra}


def pre_recipe(lang: dict[str, Any]) -> dict[str, Any]:
    """The two tokenizers, trained on the training split's text."""
    train = _data(lang, "train")
    tok = {"kind": "tokenizer", "data": train, "text_column": lang["text"], "vocab_size": 4000}
    return {
        "name": "ladder-pre",
        "seed": 0,
        "stages": {
            "tok_wp": {**tok, "algorithm": "wordpiece", "target": "mlm"},
            "tok_bpe": {**tok, "algorithm": "bpe", "target": "clm"},
        },
    }


def pretrain_recipe(lang: dict[str, Any], pre: Path, objective: str, steps: int) -> dict[str, Any]:
    """MLM (tiny BERT) or CLM (tiny GPT-2) on the training split's text, without its labels."""
    tok, family = ("tok_wp", ENCODER) if objective == "mlm" else ("tok_bpe", "gpt2")
    train = {**PRETRAIN, **PRETRAIN_BY_OBJECTIVE[objective], "max_steps": steps,
             "save_every_steps": 100000, "log_every_steps": 50,
             "eval_every_steps": max(steps // 2, 1)}  # fmt: skip
    stage: dict[str, Any] = {
        "kind": "pretrain",
        "objective": objective,
        "tokenizer": str(pre / tok / "final"),
        "model": {"family": family, **ARCH},
        "data": _data(lang, "train"),
        "text_column": lang["text"],
        "max_seq_len": PRETRAIN_SEQ,
        "validation_fraction": 0.02,
        "train": train,
    }
    return {"name": f"ladder-{objective}", "seed": 0, "stages": {objective: stage}}


def prompt_stage(lang: dict[str, Any], clm: str) -> dict[str, Any]:
    """The fields every prompt stage of the ladder shares: verbalizer classification of ``clm``."""
    return {
        "kind": "prompt",
        "from": clm,
        "task": "classification",
        "template": lang["template"],
        "verbalizer": lang["verbalizer"],
        "target_column": "label",
    }


def prompt_tuning_stage(
    lang: dict[str, Any], prompt: dict[str, Any], data: dict[str, Any], soft: dict[str, Any] = SOFT
) -> dict[str, Any]:
    """Soft prompt tuning through the verbalizer on ``data``, validated on 100 dev rows."""
    return {
        **prompt,
        "method": "prompt_tuning",
        "data": data,
        "validation": _data(lang, "dev", max_samples=100),
        "num_virtual_tokens": 8,
        "max_seq_len": lang["seq"] + 16,
        "train": {**soft, "save_every_steps": 100000, "log_every_steps": 20},
    }


def eval_stage(lang: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """One eval stage scoring ``models`` on the whole test split (accuracy, macro-F1)."""
    return {
        "kind": "eval",
        "models": models,
        "data": {**lang["test"], "files": [str(common.DATA / lang["dir"] / "test.tsv")]},
        "input_column": lang["text"],
        "label_column": "label",
        "metrics": ["accuracy", "f1"],
        "generation": {"batch_size": 32},
    }


def seed_recipe(
    lang: dict[str, Any], pre: Path, seed: int, sizes: list[int], prompt_rows: int, shots: int
) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    mlm = str(pre.parent / "ladder-mlm" / "mlm" / "final")
    clm = str(pre.parent / "ladder-clm" / "clm" / "final")
    tok_wp = str(pre / "tok_wp" / "final")
    models = []
    for n in sizes:
        rows = _data(lang, "train", shuffle_seed=seed, max_samples=n)
        base = {
            "kind": "finetune",
            "task": "classification",
            "data": rows,
            # Few labels: validate on the dev split, never on the N rows.
            "validation": _data(lang, "dev", max_samples=200),
            "text_column": lang["text"],
            "max_seq_len": lang["seq"],
            "train": {**FINETUNE, "max_steps": FT_STEPS.get(n, 150), "save_every_steps": 100000,
                      "log_every_steps": 20},
        }  # fmt: skip
        stages[f"pretrained_n{n}"] = {**base, "from": mlm}
        stages[f"scratch_n{n}"] = {
            **base,
            "model": {"family": ENCODER, **ARCH},
            "tokenizer": tok_wp,
        }
        models += [f"pretrained_n{n}", f"scratch_n{n}"]
    prompt = prompt_stage(lang, clm)
    demos = _data(lang, "train", shuffle_seed=seed, max_samples=prompt_rows)
    for cal in CALIBRATIONS:
        stages[f"zero_shot_{cal}"] = {**prompt, "method": "zero_shot", "calibration": cal}
        stages[f"few_shot_{cal}"] = {
            **prompt, "method": "few_shot", "calibration": cal, "data": demos, "shots": shots,
        }  # fmt: skip
        models += [f"zero_shot_{cal}", f"few_shot_{cal}"]
    stages["prompt_tuning"] = prompt_tuning_stage(lang, prompt, demos)
    models.append("prompt_tuning")
    stages["test"] = eval_stage(lang, models)
    return {"name": f"ladder-s{seed}", "seed": seed, "stages": stages}


def run_recipe(recipe: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one recipe through the CLI; returns its metrics.json plus wall and CPU seconds."""
    import yaml

    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    run_dir = workdir / "runs" / recipe["name"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [common.PY, "-m", "mlsteps", "run", str(path), "--run-dir", str(run_dir)],
        cwd=common.REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{path} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"metrics": metrics, "wall_s": wall, "cpu_s": cpu, "run_dir": str(run_dir)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def bench_language(name: str, args: Any, workdir: Path) -> dict[str, Any]:
    lang = LANGS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    steps = {o: 60 if args.quick else n for o, n in args.pretrain_steps.items()}
    common.log(f"[{name}] pretraining (MLM {steps['mlm']} steps, CLM {steps['clm']} steps)")
    cpu_before = _children_cpu()
    started = time.perf_counter()
    pre = run_recipe(pre_recipe(lang), workdir)
    pre_dir = Path(pre["run_dir"])
    with ThreadPoolExecutor(max_workers=2) as pool:  # MLM and CLM side by side
        jobs = [pool.submit(run_recipe, pretrain_recipe(lang, pre_dir, o, steps[o]), workdir)
                for o in ("mlm", "clm")]  # fmt: skip
        pre_metrics = {**jobs[0].result()["metrics"], **jobs[1].result()["metrics"]}
    pretrain_cpu = _children_cpu() - cpu_before
    wall = time.perf_counter() - started
    per_seed: dict[int, dict[str, Any]] = {}
    common.log(f"[{name}] seeds {args.seeds} in parallel: fine-tunes, prompts, eval")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {
            seed: pool.submit(
                run_recipe,
                seed_recipe(lang, pre_dir, seed, args.sizes, args.prompt_rows, args.shots),
                workdir,
            )
            for seed in args.seeds
        }
        for seed, future in futures.items():
            out = future.result()
            per_seed[seed] = out["metrics"]["test"]
            common.log(f"[{name}] seed {seed}: {out['wall_s']:.0f} s wall")
    wall += time.perf_counter() - started
    # RUSAGE_CHILDREN counts every finished child of this process, the seeds' runs included.
    cpu = _children_cpu() - cpu_before
    rows: dict[str, dict[str, Any]] = {}
    for model in per_seed[args.seeds[0]]:
        accs = [per_seed[s][model]["accuracy"] for s in args.seeds]
        f1s = [per_seed[s][model]["f1"] for s in args.seeds]
        rows[model] = {"accuracy": summarize(accs), "f1": summarize(f1s)}
    return {
        "language": name,
        "rows": rows,
        "per_seed": {str(s): m for s, m in per_seed.items()},
        "pretrain": {
            k: {
                m: pre_metrics[k].get(m)
                for m in (
                    "val_perplexity",
                    "initial_val_perplexity",
                    "unigram_val_perplexity",
                    "train_loss",
                    "train_vocab_coverage",
                )
            }
            for k in ("mlm", "clm")
        },  # fmt: skip
        "cpu_s": cpu,
        "pretrain_cpu_s": pretrain_cpu,
        "wall_s": wall,
        "settings": {
            "pretrain_steps": steps,
            "arch": ARCH,
            "encoder": ENCODER,
            "pretrain": PRETRAIN,
            "finetune": FINETUNE,
            "finetune_steps": FT_STEPS,
            "soft": SOFT,
            "sizes": args.sizes,
            "seeds": args.seeds,
            "prompt_rows": args.prompt_rows,
            "shots": args.shots,
            "test": lang["test"],
        },  # fmt: skip
    }


def _cell(row: dict[str, Any], key: str = "accuracy") -> str:
    s = row[key]
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}..{s['max']:.3f})"


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Mean of a minus mean of b in points, ± the standard error of that difference.

    The error is the seed-to-seed spread of each mean (sample std / sqrt(n)); both sides are
    scored on the same test rows, so it is the spread a re-run with new seeds would show.
    """
    a, b = a["accuracy"], b["accuracy"]
    stderr = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return f"{100 * (a['mean'] - b['mean']):+.1f} ± {100 * stderr:.1f}"


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    out = [
        f"Language `{res['language']}`: test accuracy / macro-F1, mean ± sample std over seeds "
        f"{res['settings']['seeds']} (min..max). {res['cpu_s'] / 60:.1f} CPU min "
        f"({res['pretrain_cpu_s'] / 60:.1f} of them pretraining), {res['wall_s'] / 60:.1f} min "
        "wall.",
        "",
        "| model | accuracy | macro-F1 |",
        "|---|---|---|",
    ]
    for model, row in rows.items():
        out.append(f"| {model} | {_cell(row)} | {_cell(row, 'f1')} |")
    out += ["", "| N | pretrained | scratch | gain (points ± std. error) |", "|---|---|---|---|"]
    for n in res["settings"]["sizes"]:
        p, s = rows[f"pretrained_n{n}"], rows[f"scratch_n{n}"]
        out.append(
            f"| {n} | {p['accuracy']['mean']:.3f} | {s['accuracy']['mean']:.3f} | {_diff(p, s)} |"
        )
    majority = rows.get("majority_baseline")
    if majority:
        out += ["", "| prompt method | above the majority baseline (points ± std. error) |",
                "|---|---|"]  # fmt: skip
        for model, row in rows.items():
            if model.startswith(("zero_shot", "few_shot", "prompt_tuning")):
                out.append(f"| {model} | {_diff(row, majority)} |")
    pre = res["pretrain"]
    out += [
        "",
        f"Pretraining ({res['settings']['pretrain_steps']} steps): MLM ({res['settings']['encoder']}) validation perplexity "
        f"{pre['mlm']['initial_val_perplexity']:.0f} -> {pre['mlm']['val_perplexity']:.1f} "
        f"(unigram {pre['mlm'].get('unigram_val_perplexity') or float('nan'):.1f}), CLM "
        f"{pre['clm']['initial_val_perplexity']:.0f} -> {pre['clm']['val_perplexity']:.1f}.",
    ]
    return "\n".join(out) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, sizes = res["rows"], res["settings"]["sizes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("pretrained", "MLM-pretrained start"), ("scratch", "from scratch")):
        means = [rows[f"{key}_n{n}"]["accuracy"]["mean"] for n in sizes]
        stds = [rows[f"{key}_n{n}"]["accuracy"]["std"] for n in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=label)
    for key, label, style in (
        ("majority_baseline", "majority baseline", ":"),
        ("few_shot_contextual", "few-shot, contextual calibration", "--"),
        ("prompt_tuning", f"prompt tuning (N={res['settings']['prompt_rows']})", "-."),
    ):
        if key in rows:
            ax.axhline(rows[key]["accuracy"]["mean"], linestyle=style, color="gray", label=label)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("labelled rows N")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{res['language']}: mean ± std over {len(res['settings']['seeds'])} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lang", default="all", choices=[*LANGS, "all"])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--prompt-rows", type=int, default=300)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--mlm-steps", type=int, default=PRETRAIN_STEPS["mlm"])
    p.add_argument("--clm-steps", type=int, default=PRETRAIN_STEPS["clm"])
    p.add_argument("--parallel", type=int, default=3, help="seed recipes run at once")
    p.add_argument("--workdir", default=None, help="keep the run directories here")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.pretrain_steps = {"mlm": args.mlm_steps, "clm": args.clm_steps}
    if args.quick:
        args.seeds, args.sizes = args.seeds[:1], args.sizes[:1]
    root = Path(args.workdir) if args.workdir else common.CACHE / "ladder"
    for name in LANGS if args.lang == "all" else [args.lang]:
        res = bench_language(name, args, root / name)
        text = markdown(res)
        print(text)
        if not args.no_write:
            common.RESULTS.mkdir(parents=True, exist_ok=True)
            plot(res, common.RESULTS / f"ladder_{name}.png")
        n300 = res["rows"].get("pretrained_n300")
        common.write_results(
            f"ladder_{name}",
            quick=args.quick,
            result=res,
            markdown=text,
            headline={
                "pretrained_n300": n300 and n300["accuracy"]["mean"],
                "scratch_n300": res["rows"].get("scratch_n300", {}).get("accuracy", {}).get("mean"),
                "cpu_min": round(res["cpu_s"] / 60, 1),
            },
            no_write=args.no_write,
        )


if __name__ == "__main__":
    main()

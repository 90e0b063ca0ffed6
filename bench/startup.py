"""CLI startup: `mlsteps --help` and `mlsteps validate RECIPE` against `python -c pass`.

Each command runs as a fresh subprocess, interleaved (pass, help, validate, pass, help, ...),
median of N runs each. Targets: --help <= 0.25 s, validate <= 0.4 s (absolute wall time, the
interpreter start included). When a target is missed, the top import-time offenders of that
command are printed (``python -X importtime``, self and cumulative microseconds).

Two rows put the target in context: ``libraries`` imports typer, typer's pydantic adapters and
pydantic and builds the recipe models (`mlsteps.recipe.specs`), i.e. what `validate` costs before
it reads a recipe; the rest of `validate` is mlsteps' own work (YAML, checks, typer's command
tree). mlsteps' bytecode is compiled first (``compileall``): an installed wheel has it, and an
editable install writes it on first use, unless PYTHONDONTWRITEBYTECODE is set (it is on some
CI and sandbox machines, where every run would otherwise recompile ~100 modules).

    .venv/bin/python bench/startup.py [--quick] [--reps N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"help": 0.25, "validate": 0.4}
HEAVY = (
    "torch",
    "transformers",
    "datasets",
    "peft",
    "accelerate",
    "sacrebleu",
    "rouge_score",
    "nltk",
    "tokenizers",
    "matplotlib",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "yaml",
    "rich",
)

# The floor under `validate`: the libraries it stands on and the recipe models pydantic builds.
LIBRARIES = "import typer, typer._adapters, pydantic, yaml, mlsteps.recipe.specs"

SMALL_RECIPE = """\
name: bench-startup
seed: 1
stages:
  tok:
    kind: tokenizer
    data: builtin:toy/corpus
    vocab_size: 2000
  pretrain:
    kind: pretrain
    objective: clm
    tokenizer: tok
    model: {family: gpt2, n_layers: 2, hidden_size: 64, n_heads: 2}
    data: builtin:toy/corpus
    train: {max_steps: 30, lr: 1e-3}
"""


def recipe_path(tmp: Path) -> tuple[Path, str]:
    quickstart = common.REPO / "configs" / "quickstart.yaml"
    if quickstart.exists():
        return quickstart, "configs/quickstart.yaml"
    path = tmp / "recipe.yaml"
    path.write_text(SMALL_RECIPE, encoding="utf-8")
    return path, "a 2-stage recipe written to a temp dir (configs/quickstart.yaml absent)"


def commands(recipe: Path) -> dict[str, list[str]]:
    # The console script: the same file `make install` puts next to the interpreter.
    script = str(Path(sys.executable).parent / "mlsteps")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "help": [sys.executable, script, "--help"],
        "validate": [sys.executable, script, "validate", str(recipe)],
        "libraries": [sys.executable, "-c", LIBRARIES],
    }


def import_profile(argv: list[str], runs: int = 3) -> list[dict[str, Any]]:
    """Modules by median cumulative import time (µs) over ``runs`` runs of ``-X importtime``."""
    samples: dict[str, list[tuple[int, int, int]]] = {}
    for _ in range(runs):
        proc = subprocess.run(
            [argv[0], "-X", "importtime", *argv[1:]],
            cwd=common.REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = _parse(line)
            depth = (len(name) - len(name.lstrip(" "))) // 2
            samples.setdefault(name.strip(), []).append((int(self_us), int(cum_us), depth))
    rows = []
    for name, values in samples.items():
        rows.append(
            {
                "module": name,
                "self_ms": common.median([v[0] for v in values]) / 1000,
                "cumulative_ms": common.median([v[1] for v in values]) / 1000,
                "depth": min(v[2] for v in values),
            }
        )
    return sorted(rows, key=lambda r: -r["cumulative_ms"])


def _parse(line: str) -> tuple[str, str, str]:
    """``import time: self | cumulative |   name`` -> (self, cumulative, indented name)."""
    self_us, cum_us, name = line.split(":", 1)[1].split("|", 2)
    return self_us.strip(), cum_us.strip(), name.rstrip("\n")[1:]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="runs per command (default 15, quick 3)")
    args = p.parse_args()
    reps = args.reps or (3 if args.quick else 15)
    subprocess.run(  # bytecode as an installed wheel has it (see the docstring)
        [sys.executable, "-m", "compileall", "-q", str(common.REPO / "mlsteps")],
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
    )
    with tempfile.TemporaryDirectory() as tmp:
        recipe, recipe_note = recipe_path(Path(tmp))
        cmds = commands(recipe)
        for name, argv in cmds.items():  # a failing command would time an error path
            proc = subprocess.run(argv, cwd=common.REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                common.log(f"warning: {name} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
        cpu: dict[str, list[float]] = {k: [] for k in cmds}

        def one(name: str) -> float:
            wall, used = common.time_subprocess_cpu(cmds[name])
            cpu[name].append(used)
            return wall

        times = common.interleave({k: (lambda k=k: one(k)) for k in cmds}, reps, warmup=1)
        base = common.median(times["python -c pass"])
        rows, result_rows = [], []
        for name, values in times.items():
            med = common.median(values)
            target = TARGETS.get(name)
            row = {
                "command": name,
                "median_s": med,
                "min_s": min(values),
                "max_s": max(values),
                "cpu_median_s": common.median(cpu[name][1:]),  # [0] was the warm-up run
                "over_python_s": med - base,
                "target_s": target,
                "verdict": common.verdict(med, target, higher_is_better=False) if target else "",
            }
            result_rows.append(row)
            rows.append([row[k] for k in row])
        headers = [
            "command",
            "median s",
            "min s",
            "max s",
            "CPU s (median)",
            "minus python s",
            "target s",
            "verdict",
        ]
        out = common.table(headers, rows)
        load = os.getloadavg()[0]
        note = (
            f"Recipe: {recipe_note}. {reps} interleaved subprocess runs each (after one "
            f"warm-up run); wall time is the target's measure, CPU time (user+sys) is the "
            f"steadier one on a shared machine (load average {load:.1f} on {os.cpu_count()} "
            f"CPUs at the start).\n"
        )
        print(note)
        print(out)
        md = [note, out]
        profiles: dict[str, Any] = {}
        for row in result_rows:
            name = row["command"]
            prof = import_profile(cmds[name]) if name in TARGETS else []
            if not prof:
                continue
            heavy = sorted({m["module"].split(".")[0] for m in prof} & set(HEAVY))
            profiles[name] = {"heavy_imported": heavy, "top": prof[:40]}
            if row["verdict"] == "met":
                continue
            top = [m for m in prof if m["depth"] <= 1][:12]
            mtable = common.table(
                ["module (top level)", "cumulative ms", "self ms"],
                [[m["module"], m["cumulative_ms"], m["self_ms"]] for m in top],
            )
            self_top = sorted(prof, key=lambda m: -m["self_ms"])[:10]
            stable = common.table(
                ["module (any depth)", "self ms", "cumulative ms"],
                [[m["module"], m["self_ms"], m["cumulative_ms"]] for m in self_top],
            )
            text = (
                f"\n### `{name}` is over target: import-time offenders (-X importtime, median "
                f"of 3)\n\nHeavy packages imported: {', '.join(heavy) or 'none'}\n\n{mtable}\n\n"
                f"{stable}\n"
            )
            print(text)
            md.append(text)
    common.write_results(
        "startup",
        quick=args.quick,
        result={"reps": reps, "recipe": recipe_note, "rows": result_rows, "profiles": profiles},
        markdown="\n".join(md),
        headline={f"{r['command']}_s": round(r["median_s"], 3) for r in result_rows},
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()

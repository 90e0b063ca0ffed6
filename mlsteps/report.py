"""metrics.json + state.json + metrics.jsonl -> report.md (+ PNG curves); rich tables for the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlsteps.rundir import atomic_write_text, read_json

# Keys that describe a number rather than being one; shown under the table, not as columns.
_CONVENTION_SUFFIXES = ("_convention", "_signature", "_note", "_tokenizer")


def _is_convention(key: str) -> bool:
    return key.endswith(_CONVENTION_SUFFIXES)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.2f}"
    return str(value)


def is_ladder(stage_metrics: Any) -> bool:
    """An eval stage's metrics: {model: {metric: value}} (one row per model)."""
    return (
        isinstance(stage_metrics, dict)
        and bool(stage_metrics)
        and all(isinstance(v, dict) for v in stage_metrics.values())
    )


def ladder_rows(stage_metrics: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and convention notes of a stage-ladder table."""
    columns: list[str] = []
    notes: list[str] = []
    for model, values in stage_metrics.items():
        for key, value in values.items():
            if _is_convention(key):
                note = f"{model}: {key} = {value}"
                if note not in notes:
                    notes.append(note)
            elif key not in columns:
                columns.append(key)
    rows = [
        [model, *(_fmt(values.get(c, "")) for c in columns)]
        for model, values in stage_metrics.items()
    ]
    return ["model", *columns], rows, notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (killed mid-write) is ignored."""
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(stage_dir: Path) -> list[str]:
    """Write loss.png and lr.png for a training stage; returns the file names written."""
    log = read_metrics_log(stage_dir / "metrics.jsonl")
    train = [r for r in log if "loss" in r and "step" in r]
    evals = [r for r in log if "val_loss" in r and "step" in r]
    lrs = [r for r in log if "lr" in r and "step" in r]
    if not train and not evals:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            label="validation loss",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stage_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append("loss.png")
    if lrs:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.plot([r["step"] for r in lrs], [r["lr"] for r in lrs])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{stage_dir.name}: learning rate")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(stage_dir / "lr.png", dpi=100)
        plt.close(fig)
        written.append("lr.png")
    return written


def build_report(run_dir: Path, *, plots: bool = True) -> str:
    """Render report.md's text from the run directory's files."""
    state = read_json(run_dir / "state.json", {}) or {}
    metrics = read_json(run_dir / "metrics.json", {}) or {}
    env = read_json(run_dir / "env.json", {}) or {}
    stages = state.get("stages", {})
    out = [f"# mlsteps run: {state.get('name', run_dir.name)}", ""]
    device = env.get("device", {})
    pk = env.get("packages", {})
    total = sum(s.get("duration_s") or 0 for s in stages.values())
    out += [
        f"- run directory: `{run_dir}`",
        f"- stages: {len(stages)} ({sum(s.get('status') == 'done' for s in stages.values())} done)",
        f"- time in stages: {total:.1f} s",
        f"- device: {device.get('name') or device.get('type', 'unknown')}",
        f"- versions: python {env.get('python')}, mlsteps {pk.get('mlsteps')}, torch {pk.get('torch')}, "
        f"transformers {pk.get('transformers')}, peft {pk.get('peft')}",
        "",
        "| stage | kind | status | duration (s) |",
        "|---|---|---|---|",
    ]
    for name, s in stages.items():
        out.append(
            f"| [{name}](#{name}) | {s.get('kind')} | {s.get('status')} | {_fmt(s.get('duration_s'))} |"
        )
    out.append("")
    for name, s in stages.items():
        out += [f"## {name}", "", f"kind `{s.get('kind')}`, status **{s.get('status')}**", ""]
        if s.get("error"):
            out += [f"> error: {s['error']}", ""]
        m = metrics.get(name)
        if isinstance(m, dict) and is_ladder(m):
            header, rows, notes = ladder_rows(m)
            out += ["Stage ladder (one row per model):", "", _md_table(header, rows), ""]
            out += [f"- {n}" for n in notes] + ([""] if notes else [])
        elif isinstance(m, dict) and m:
            values = [[k, _fmt(v)] for k, v in m.items() if not _is_convention(k)]
            out += [_md_table(["metric", "value"], values), ""]
            out += [f"- {k}: `{v}`" for k, v in m.items() if _is_convention(k)]
            out.append("")
        stage_dir = run_dir / name
        images = plot_curves(stage_dir) if plots and s.get("status") in ("done", "failed") else []
        for img in images:
            out += [f"![{name} {img}]({name}/{img})", ""]
        links = []
        if (stage_dir / "final").exists():
            links.append(f"[final/]({name}/final)")
        for extra in sorted(stage_dir.glob("predictions*.jsonl")):
            links.append(f"[{extra.name}]({name}/{extra.name})")
        if links:
            out += ["Outputs: " + ", ".join(links), ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(run_dir: Path) -> Path:
    path = run_dir / "report.md"
    atomic_write_text(path, build_report(run_dir))
    return path


def print_report(run_dir: Path) -> None:
    """Show the run in the terminal with rich tables (same content as report.md)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = read_json(run_dir / "state.json", {}) or {}
    metrics = read_json(run_dir / "metrics.json", {}) or {}
    table = Table(title=f"run {state.get('name', run_dir.name)} — {run_dir}")
    for col in ("stage", "kind", "status", "duration (s)"):
        table.add_column(col)
    for name, s in state.get("stages", {}).items():
        table.add_row(name, str(s.get("kind")), str(s.get("status")), _fmt(s.get("duration_s")))
    console.print(table)
    for name, m in metrics.items():
        if isinstance(m, dict) and is_ladder(m):
            header, rows, notes = ladder_rows(m)
            t = Table(title=f"{name}: stage ladder")
            for h in header:
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            console.print(t)
            for n in notes:
                console.print(f"  [dim]{n}[/dim]")
        elif isinstance(m, dict) and m:
            t = Table(title=name)
            t.add_column("metric")
            t.add_column("value")
            for k, v in m.items():
                if not _is_convention(k):
                    t.add_row(k, _fmt(v))
            console.print(t)
    console.print(f"report: {run_dir / 'report.md'}")

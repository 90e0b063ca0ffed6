"""state.json + metrics.json + recipe.yaml + metrics.jsonl -> report.md (+ PNG curves); rich tables.

report.md: a run summary (recipe, time, device, versions), the stage ladder of every eval stage
(best value per metric in bold), then one section per stage: what it did (kind and key settings
from recipe.yaml, the full stage config folded away), its metrics with their conventions, its loss
and learning-rate curves, and links to final/ and predictions. ``mlsteps report`` prints the same
in the terminal, ending with the ladder and the report's path.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mlsteps.report.data import failed_attempt, load_run
from mlsteps.report.ladder import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    PERPLEXITY_LEGEND,
    best_cells,
    cell,
    fmt,
    is_convention,
    is_error_of,
    is_ladder,
    ladder_md,
    ladder_rows,
    ladders,
    md_table,
)
from mlsteps.report.plots import loss_label, plot_comparison, plot_curves, read_metrics_log
from mlsteps.report.text import (
    describe_stage,
    headline,
    settings_line,
)
from mlsteps.rundir import atomic_write_text, read_json

__all__ = [
    "HIGHER_IS_BETTER", "LOWER_IS_BETTER", "best_cells", "build_report", "is_ladder",
    "ladder_rows", "load_run", "plot_curves", "print_report", "read_metrics_log", "write_report",
]  # fmt: skip

# Ladder columns left out of the terminal table (still in report.md): detail, or a near-duplicate.
_TERMINAL_HIDDEN = frozenset(
    {"perplexity_tokens", "word_perplexity", "rougeLsum", "bits_per_byte",
     "response_perplexity_tokens", "response_word_perplexity", "response_bits_per_byte"}
)  # fmt: skip
_TERMINAL_NAMES = {
    "perplexity": "ppl", "response_perplexity": "resp ppl", "exact_match": "EM",
    "token_f1": "tok F1",
}  # fmt: skip
# Per-stage files linked from the report, besides final/ and predictions*.jsonl.
_EXTRA_FILES = ("prompts_preview.jsonl", "metrics.jsonl", "tensorboard", "mlruns")  # + tracker logs


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _summary(run_dir: Path, state: dict[str, Any], env: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the run summary."""
    stages = state.get("stages", {})
    device = env.get("device", {}) or {}
    pk = env.get("packages", {}) or {}
    done = sum(s.get("status") == "done" for s in stages.values())
    starts = [t for s in stages.values() if (t := _parse_time(s.get("started_at")))]
    ends = [t for s in stages.values() if (t := _parse_time(s.get("finished_at")))]
    total = sum(s.get("duration_s") or 0 for s in stages.values())
    when = f"{min(starts):%Y-%m-%d %H:%M:%S %Z}".strip() if starts else "not started"
    span = ""
    if starts and ends:  # a run that has not finished a stage has no span yet
        span = f", {(max(ends) - min(starts)).total_seconds():.0f} s first start to last finish"
    dev = device.get("name") or device.get("type", "unknown")
    if device.get("threads"):
        dev += f", {device['threads']} threads"
    versions = ", ".join(
        f"{name} {pk.get(name)}"
        for name in ("mlsteps", "torch", "transformers", "datasets", "tokenizers", "peft")
        if pk.get(name)
    )
    return [
        ("recipe", f"{state.get('name', run_dir.name)} ([recipe.yaml](recipe.yaml))"),
        ("run directory", f"`{run_dir}`"),
        ("stages", f"{len(stages)} ({done} done)"),
        ("started", when),
        ("time", f"{total:.1f} s in stages" + span),
        ("device", f"{dev} ({env.get('hostname', '?')}, {env.get('cpu_count', '?')} CPUs)"),
        ("versions", f"python {env.get('python')}, {versions}"),
        ("git", f"`{env['git_sha'][:12]}`" if env.get("git_sha") else "not a git checkout"),
    ]


def _links(run_dir: Path, name: str) -> list[str]:
    stage_dir = run_dir / name
    links = []
    if (stage_dir / "final").exists():
        links.append(f"[final/]({name}/final)")
    links += [f"[{p.name}]({name}/{p.name})" for p in sorted(stage_dir.glob("predictions*.jsonl"))]
    links += [f"[{f}]({name}/{f})" for f in _EXTRA_FILES if (stage_dir / f).exists()]
    return links


def build_report(run_dir: Path, *, plots: bool = True) -> str:
    """Render report.md's text from the run directory's files."""
    state, metrics, recipe, dropped = load_run(run_dir)
    env = read_json(run_dir / "env.json", {}) or {}
    specs: dict[str, Any] = recipe.get("stages") or {}
    stages: dict[str, Any] = state.get("stages", {})
    out = [f"# mlsteps run: {state.get('name', run_dir.name)}", ""]
    if recipe.get("description"):
        out += [f"> {str(recipe['description']).strip()}", ""]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary(run_dir, state, env)]
    out += ["", "| stage | kind | status | time (s) | result |", "|---|---|---|---|---|"]
    for name, s in stages.items():
        result = headline(s.get("kind"), metrics.get(name))
        out.append(
            f"| [{name}](#{name}) | {s.get('kind')} | {s.get('status')} | "
            f"{fmt(s.get('duration_s'))} | {result} |"
        )
    out.append("")
    if dropped:
        out += [
            "Not in the current recipe (results kept in their folders): "
            + ", ".join(f"`{n}`" for n in dropped),
            "",
        ]
    for name, ladder in ladders(metrics).items():
        out += [f"## Stage ladder ({name})", ""]
        data = specs.get(name, {}).get("data")
        out += [f"Every model scored on {settings_line('data', data)}; best value in bold.", ""]
        out += ladder_md(name, ladder)
    # Stages are compared only when their losses are the same quantity (per token, per
    # example, ...): a classifier's loss next to a translation fine-tune's means nothing.
    groups: dict[tuple[str, str], list[str]] = {}
    for name, s in stages.items():
        if s.get("status") in ("done", "failed"):
            key = (str(s.get("kind")), loss_label(specs.get(name)))
            groups.setdefault(key, []).append(name)
    kinds = [kind for kind, _ in groups]
    for (kind, label), names in groups.items():
        tag = kind if kinds.count(kind) == 1 else f"{kind}_{re.sub(r'[^a-z]+', '_', label)}"
        image = plot_comparison(run_dir, tag, names, label) if plots and len(names) > 1 else None
        if image:
            out += [f"## {kind} stages compared ({label})", "", f"![{kind} loss curves]({image})"]
            out += [""]
    for name, s in stages.items():
        out += _stage_section(run_dir, name, s, specs.get(name), metrics.get(name), plots)
    out += ["## Files", ""]
    out += [
        f"- [{f}]({f})"
        for f in ("recipe.yaml", "state.json", "metrics.json", "env.json")
        if (run_dir / f).exists()
    ]
    return "\n".join(out).rstrip() + "\n"


def _prune(value: Any) -> Any:
    """A config without its null fields (unset options), for reading."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    return value


def _stage_section(
    run_dir: Path,
    name: str,
    s: dict[str, Any],
    spec: dict[str, Any] | None,
    m: Any,
    plots: bool,
) -> list[str]:
    out = [f"## {name}", "", f"kind `{s.get('kind')}`, status **{s.get('status')}**", ""]
    if s.get("duration_s") is not None:
        out[-2] += f", {s['duration_s']:.1f} s"
    if s.get("error"):
        out += [f"> error: {s['error']}", ""]
    failed = failed_attempt(run_dir, name)
    if failed:
        out += [f"> {failed}", ""]
    if spec:
        out += [describe_stage(spec), ""]
        body = yaml.safe_dump({name: _prune(spec)}, sort_keys=False, allow_unicode=True).rstrip()
        out += ["<details><summary>stage config (recipe.yaml, unset fields left out)</summary>", ""]
        out += ["```yaml", body, "```", "", "</details>", ""]
    if isinstance(m, dict) and is_ladder(m):
        out += [f"One row per model: see [the stage ladder](#stage-ladder-{name}).", ""]
        out += ladder_md(name, m)
    elif isinstance(m, dict) and m:
        values = [[k, cell(m, k)] for k in m if not is_convention(k) and not is_error_of(k, m)]
        out += [md_table(["metric", "value"], values), ""]
        conventions = [f"- {k}: `{v}`" for k, v in m.items() if is_convention(k)]
        out += conventions + ([""] if conventions else [])
    stage_dir = run_dir / name
    done = plots and s.get("status") in ("done", "failed")
    images = plot_curves(stage_dir, loss_label(spec)) if done else []
    for img in images:
        out += [f"![{name} {img}]({name}/{img})", ""]
    links = _links(run_dir, name)
    if links:
        out += ["Outputs: " + ", ".join(links), ""]
    return out


def _short(cell: str) -> str:
    """A ladder number with at most 3 significant digits (the terminal is narrow)."""
    try:
        value = float(cell.replace(",", ""))
    except ValueError:
        return cell
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def write_report(run_dir: Path) -> Path:
    path = run_dir / "report.md"
    atomic_write_text(path, build_report(run_dir))
    return path


def print_report(run_dir: Path) -> None:
    """Show the run in the terminal with rich tables (same content as report.md), ending with
    the stage ladder and where report.md is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    state, metrics, recipe, _ = load_run(run_dir)
    env = read_json(run_dir / "env.json", {}) or {}
    specs: dict[str, Any] = recipe.get("stages") or {}
    for label, value in _summary(run_dir, state, env):
        if label not in ("recipe", "run directory"):
            console.print(f"[dim]{label}:[/dim] {value.replace('`', '')}", highlight=False)
    table = Table(title=f"run {state.get('name', run_dir.name)}: stages", title_justify="left")
    table.add_column("stage", style="bold")
    table.add_column("status")
    table.add_column("time (s)", justify="right")
    table.add_column("what it did / result", overflow="fold")
    for name, s in state.get("stages", {}).items():
        status = str(s.get("status"))
        style = {"done": "green", "failed": "red", "running": "yellow"}.get(status, "")
        what = describe_stage(specs[name], short=True) if name in specs else str(s.get("kind"))
        result = headline(s.get("kind"), metrics.get(name))
        table.add_row(
            name,
            f"[{style}]{status}[/{style}]" if style else status,
            fmt(s.get("duration_s")),
            f"[dim]{escape(what)}[/dim]" + (f"\n{escape(result)}" if result else ""),
        )
    console.print(table)
    for name in state.get("stages", {}):
        failed = failed_attempt(run_dir, name)
        if failed:
            console.print(f"[yellow]{escape(name)}: {escape(failed)}[/yellow]", highlight=False)
    for name, ladder in ladders(metrics).items():
        header, rows, notes = ladder_rows(ladder, hide=_TERMINAL_HIDDEN)
        bold = best_cells(ladder, header)
        data = settings_line("data", specs.get(name, {}).get("data"))
        t = Table(title=f"stage ladder ({name}): {data}", title_justify="left")
        for k, h in enumerate(header):
            if k == 0:
                t.add_column(h, no_wrap=True)
            else:
                t.add_column(_TERMINAL_NAMES.get(h, h), justify="right", no_wrap=True)
        for r, row in enumerate(rows):
            cells = [c if k == 0 else _short(c) for k, c in enumerate(row)]
            t.add_row(
                *(f"[bold green]{c}[/]" if (r, k) in bold else c for k, c in enumerate(cells))
            )
        console.print(t)
        console.print(
            "  [dim]best per column in bold green (ppl = perplexity, EM = exact match); every "
            "score on 0-100 (ROUGE/accuracy/F1/EM/preference x100); conventions in report.md[/dim]"
        )
        for column in (c for c in PERPLEXITY_LEGEND if c in header):
            console.print(f"  [dim]{_TERMINAL_NAMES[column]} = {PERPLEXITY_LEGEND[column]}[/dim]")
    console.print(f"report: {run_dir / 'report.md'}", highlight=False)

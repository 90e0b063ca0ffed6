"""state.json + metrics.json + recipe.yaml + metrics.jsonl -> report.md (+ PNG curves); rich tables.

report.md: a run summary (recipe, time, device, versions), the stage ladder of every eval stage
(best value per metric in bold), then one section per stage: what it did (kind and key settings
from recipe.yaml, the full stage config folded away), its metrics with their conventions, its loss
and learning-rate curves, and links to final/ and predictions. ``mlsteps report`` prints the same
in the terminal, ending with the ladder and the report's path.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mlsteps.metrics import table
from mlsteps.report.data import failed_attempt, load_run
from mlsteps.report.plots import loss_label, plot_comparison, plot_curves, read_metrics_log
from mlsteps.report.text import (
    LADDER_SCALE_NOTE,
    PERCENT_SCALED,
    describe_stage,
    headline,
    ladder_value,
    settings_line,
)
from mlsteps.rundir import atomic_write_text, read_json

__all__ = [
    "build_report", "is_ladder", "ladder_rows", "load_run", "plot_curves", "print_report",
    "read_metrics_log", "write_report",
]  # fmt: skip

# Keys that describe a number rather than being one; shown under the table, not as columns.
LM_EVAL_NOTE = (
    "lm-eval columns (<task>/<metric>,<filter>) are lm-eval's numbers on its own scale "
    "(accuracy 0-1), as in its results files"
)
_CONVENTION_SUFFIXES = ("_convention", "_signature", "_note", "_tokenizer")
# ``key_error`` explains why ``key`` is null (a non-finite value); shown in key's cell.
_ERROR_SUFFIX = "_error"
# Direction of each ladder metric, to mark the best model per column (the metric table's).
HIGHER_IS_BETTER = frozenset(k for k, c in table.COLUMNS.items() if c.better == "max")
LOWER_IS_BETTER = frozenset(k for k, c in table.COLUMNS.items() if c.better == "min")
# Ladder columns left out of the terminal table (still in report.md): detail, or a near-duplicate.
_TERMINAL_HIDDEN = frozenset(
    {"perplexity_tokens", "word_perplexity", "rougeLsum", "bits_per_byte",
     "response_perplexity_tokens", "response_word_perplexity", "response_bits_per_byte"}
)  # fmt: skip
_TERMINAL_NAMES = {
    "perplexity": "ppl", "response_perplexity": "resp ppl", "exact_match": "EM",
    "token_f1": "tok F1",
}  # fmt: skip
# What each perplexity column of a ladder means, said once under the table.
PERPLEXITY_LEGEND = {
    "perplexity": "of the text column as bare text (no prompt)",
    "response_perplexity": "of the reference given each model's own prompt (template, "
    "demonstrations, soft prompt; the encoder input for seq2seq)",
}
# Per-stage files linked from the report, besides final/ and predictions*.jsonl.
_EXTRA_FILES = ("prompts_preview.jsonl", "metrics.jsonl", "tensorboard", "mlruns")  # + tracker logs


def _is_convention(key: str) -> bool:
    return key.endswith(_CONVENTION_SUFFIXES)


def _is_error_of(key: str, values: dict[str, Any]) -> bool:
    return key.endswith(_ERROR_SUFFIX) and key[: -len(_ERROR_SUFFIX)] in values


def _cell(values: dict[str, Any], key: str) -> str:
    """A ladder cell: on the table's 0-100 scale, or why the metric has no number."""
    return _fmt(ladder_value(key, values.get(key, "")), values.get(key + _ERROR_SUFFIX))


def _fmt(value: Any, error: Any = None) -> str:
    if value is None and error:
        return f"n/a: {error}"  # a non-finite metric, recorded as null with its reason
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


def _best(stage_metrics: dict[str, Any], column: str) -> float | None:
    values = [
        v.get(column)
        for v in stage_metrics.values()
        if isinstance(v.get(column), int | float) and not isinstance(v.get(column), bool)
    ]
    values = [v for v in values if math.isfinite(v)]
    if len(set(values)) < 2 or column not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
        return None  # nothing to compare, or every model ties
    return max(values) if column in HIGHER_IS_BETTER else min(values)


def ladder_rows(
    stage_metrics: dict[str, Any], *, hide: frozenset[str] = frozenset()
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and convention notes of a stage-ladder table (``hide``: columns left out).

    A convention shared by every model is noted once, without a model name.
    """
    columns: list[str] = []
    conventions: dict[str, dict[str, Any]] = {}
    for model, values in stage_metrics.items():
        for key, value in values.items():
            if _is_convention(key):
                conventions.setdefault(key, {})[model] = value
            elif _is_error_of(key, values):
                continue
            elif key not in columns and key not in hide:
                columns.append(key)
    notes: list[str] = []
    for key, per_model in conventions.items():
        distinct = {json.dumps(v, default=str) for v in per_model.values()}
        if len(distinct) == 1 and len(per_model) == len(stage_metrics):
            notes.append(f"{key} = {next(iter(per_model.values()))}")
        else:
            notes += [f"{model}: {key} = {value}" for model, value in per_model.items()]
    if PERCENT_SCALED & set(columns):
        notes.insert(0, LADDER_SCALE_NOTE)
    if any("/" in c and "," in c for c in columns):  # engine.harness: <task>/<metric>,<filter>
        notes.insert(0, LM_EVAL_NOTE)
    rows = [
        [model, *(_cell(values, c) for c in columns)] for model, values in stage_metrics.items()
    ]
    return ["model", *columns], rows, notes


def best_cells(stage_metrics: dict[str, Any], header: list[str]) -> set[tuple[int, int]]:
    """(row, column) positions of the best value of each directed metric column."""
    marked: set[tuple[int, int]] = set()
    for col, name in enumerate(header[1:], start=1):
        best = _best(stage_metrics, name)
        if best is None:
            continue
        for row, values in enumerate(stage_metrics.values()):
            if values.get(name) == best:
                marked.add((row, col))
    return marked


def _md_table(header: list[str], rows: list[list[str]], bold: set[tuple[int, int]] = set()) -> str:  # noqa: B006 - read only
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, row in enumerate(rows):
        cells = [f"**{c}**" if (r, k) in bold else c for k, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _ladders(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: m for name, m in metrics.items() if is_ladder(m)}


def perplexity_legend(header: list[str]) -> list[str]:
    """Lines saying what the ladder's perplexity columns measure (none without such columns)."""
    return [f"{column} = {text}" for column, text in PERPLEXITY_LEGEND.items() if column in header]


def _ladder_md(name: str, ladder: dict[str, Any]) -> list[str]:
    header, rows, notes = ladder_rows(ladder)
    out = [_md_table(header, rows, best_cells(ladder, header)), ""]
    legend = perplexity_legend(header)
    if legend:
        out += [f"Perplexity: {'; '.join(legend)}.", ""]
    if notes:
        out += ["Conventions:", ""] + [f"- `{n}`" for n in notes] + [""]
    return out


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
            f"{_fmt(s.get('duration_s'))} | {result} |"
        )
    out.append("")
    if dropped:
        out += [
            "Not in the current recipe (results kept in their folders): "
            + ", ".join(f"`{n}`" for n in dropped),
            "",
        ]
    for name, ladder in _ladders(metrics).items():
        out += [f"## Stage ladder ({name})", ""]
        data = specs.get(name, {}).get("data")
        out += [f"Every model scored on {settings_line('data', data)}; best value in bold.", ""]
        out += _ladder_md(name, ladder)
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
        out += _ladder_md(name, m)
    elif isinstance(m, dict) and m:
        values = [[k, _cell(m, k)] for k in m if not _is_convention(k) and not _is_error_of(k, m)]
        out += [_md_table(["metric", "value"], values), ""]
        conventions = [f"- {k}: `{v}`" for k, v in m.items() if _is_convention(k)]
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
            _fmt(s.get("duration_s")),
            f"[dim]{escape(what)}[/dim]" + (f"\n{escape(result)}" if result else ""),
        )
    console.print(table)
    for name in state.get("stages", {}):
        failed = failed_attempt(run_dir, name)
        if failed:
            console.print(f"[yellow]{escape(name)}: {escape(failed)}[/yellow]", highlight=False)
    for name, ladder in _ladders(metrics).items():
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

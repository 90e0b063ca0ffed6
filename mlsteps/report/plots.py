"""Loss and learning-rate curves of training stages (matplotlib Agg, headless), read from each
stage's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (killed mid-write) is ignored."""
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(log: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key; null (non-finite) values and repeated steps dropped."""
    points: dict[float, float] = {}
    for r in log:
        value, step = r.get(key), r.get("step")
        if isinstance(value, int | float) and isinstance(step, int | float):
            points[step] = value  # a resumed run re-logs a step: the last record wins
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def loss_label(spec: Any) -> str:
    """The y-axis label of a training stage's loss: what the mean is taken over depends on the
    stage (a classifier's loss is per example, not per token)."""
    if not isinstance(spec, dict):
        return "loss (nats)"
    kind, task = spec.get("kind"), spec.get("task")
    if kind == "pretrain":
        return "loss (nats/masked token)" if spec.get("objective") == "mlm" else "loss (nats/token)"
    if kind == "finetune" and task == "classification":
        weighted = "class-weighted " if spec.get("class_weights") else ""
        return f"{weighted}cross-entropy (nats/example)"
    if kind == "finetune" and task == "seq2seq":
        return "loss (nats/target token)"
    if kind == "finetune":
        return "loss (nats/response token)"
    if kind == "prompt":
        return "loss (nats/answer token)"
    return "loss (nats)"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stage_dir: Path, ylabel: str = "loss (nats)") -> list[str]:
    """Write loss.png and lr.png for a training stage; returns the file names written.
    ``ylabel``: the loss axis label (:func:`loss_label` of the stage's spec)."""
    log = read_metrics_log(stage_dir / "metrics.jsonl")
    train, val, lr = _series(log, "loss"), _series(log, "val_loss"), _series(log, "lr")
    named = _named_val_losses(log)
    if not train[0] and not val[0] and not named:
        return []
    plt = _pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train[0]:
        ax.plot(*train, label="train loss")
    if val[0]:
        ax.plot(*val, "o-", label="validation loss")
    for set_name, series in named.items():
        ax.plot(*series, "o-", label=f"validation loss ({set_name})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{stage_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stage_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append("loss.png")
    if lr[0]:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.plot(*lr)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{stage_dir.name}: learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(stage_dir / "lr.png", dpi=100)
        plt.close(fig)
        written.append("lr.png")
    written += _reward_curves(stage_dir, log)
    return written


def _named_val_losses(log: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{set name: (steps, values)} of named validation sets (val_<name>_loss keys)."""
    keys = sorted({k for r in log for k in r if k.startswith("val_") and k.endswith("_loss")})
    named = {k[len("val_") : -len("_loss")]: _series(log, k) for k in keys if k != "val_loss"}
    return {name: series for name, series in named.items() if series[0]}


def _reward_curves(stage_dir: Path, log: list[dict[str, Any]]) -> list[str]:
    """rewards.png for preference stages: reward margin and reward accuracy, train and val."""
    keys = ("reward_margin", "reward_accuracy")
    series = {k: (_series(log, k), _series(log, f"val_{k}")) for k in keys}
    if not any(s[0] for pair in series.values() for s in pair):
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, keys, strict=True):
        train, val = series[key]
        if train[0]:
            ax.plot(*train, label="train")
        if val[0]:
            ax.plot(*val, "o-", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{stage_dir.name}: implicit reward (chosen - rejected)")
    fig.tight_layout()
    fig.savefig(stage_dir / "rewards.png", dpi=100)
    plt.close(fig)
    return ["rewards.png"]


def plot_comparison(
    run_dir: Path, kind: str, names: list[str], ylabel: str = "loss (nats)"
) -> str | None:
    """Overlay the loss curves of several stages of one kind with the same loss (e.g. a
    fine-tune from a pretrained model and the same fine-tune from scratch) in
    ``<run_dir>/compare_<kind>.png``; the caller groups stages by :func:`loss_label`."""
    logs = {n: read_metrics_log(run_dir / n / "metrics.jsonl") for n in names}
    if sum(bool(_series(log, "loss")[0]) for log in logs.values()) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (name, log) in enumerate(logs.items()):
        color = f"C{k}"
        steps, values = _series(log, "loss")
        if steps:
            ax.plot(steps, values, color=color, label=f"{name} train")
        steps, values = _series(log, "val_loss")
        if steps:
            ax.plot(steps, values, "o--", color=color, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{kind} stages: loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    name = f"compare_{kind}.png"
    fig.savefig(run_dir / name, dpi=100)
    plt.close(fig)
    return name

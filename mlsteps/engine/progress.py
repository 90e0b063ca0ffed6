"""A rich progress bar on stderr for training loops (steps, loss, lr, tokens/s, ETA)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """Step progress; a no-op when disabled (quiet runs, tests)."""

    def __init__(self, *, enabled: bool, label: str):
        self.enabled = enabled
        self.label = label
        self._progress: Progress | None = None
        self._task: Any = None
        self._fields: dict[str, Any] = {"loss": "-", "lr": "-", "tps": "-"}

    def start(self, total_steps: int, done_steps: int) -> None:
        if not self.enabled or self._progress is not None:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.label, total=total_steps, completed=done_steps, **self._fields
        )

    def advance(self, step: int, loss: float | None) -> None:
        if self._progress is None:
            return
        if loss is not None:
            self._fields["loss"] = f"{loss:.4f}"
        self._progress.update(self._task, completed=step, **self._fields)

    def update_metrics(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        if record.get("lr") is not None:
            self._fields["lr"] = f"{record['lr']:.2e}"
        if record.get("tokens_per_s") is not None:
            self._fields["tps"] = f"{record['tokens_per_s']:,.0f}"
        self._progress.update(self._task, **self._fields)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

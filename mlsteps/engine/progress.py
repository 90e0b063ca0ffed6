"""Training progress on stderr (steps, loss, lr, tokens/s, ETA): a rich bar on a terminal; in a
log file or a pipe (stderr not a TTY), where a bar only shows up once it is finished, one plain
line every ``LINES`` th of the run instead."""

from __future__ import annotations

import sys
import time
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
        if not Console(stderr=True).is_terminal:
            self._progress = _LineProgress(self.label, total_steps, done_steps)  # type: ignore[assignment]
            self._task = 0
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


class _LineProgress:
    """Progress as log lines: ``stage: step 40/400 (10%) loss 3.2 lr 1e-3 1,234 tok/s ETA 2m``,
    one every tenth of the run (and at the last step); the same calls as rich's Progress."""

    LINES = 10

    def __init__(self, label: str, total: int, done: int):
        self.label = label
        self.total = max(total, 1)
        self.every = max(1, self.total // self.LINES)
        self.first = done
        self.started = time.perf_counter()
        self.last_printed = done

    def update(self, task: Any, completed: int | None = None, **fields: Any) -> None:
        if completed is None or completed == self.last_printed:
            return
        if completed % self.every and completed < self.total:
            return
        self.last_printed = completed
        elapsed = time.perf_counter() - self.started
        rate = (completed - self.first) / elapsed if elapsed > 0 else 0.0
        eta = f" ETA {(self.total - completed) / rate:.0f}s" if rate > 0 else ""
        print(
            f"{self.label}: step {completed}/{self.total} ({completed / self.total:.0%}) "
            f"loss {fields.get('loss', '-')} lr {fields.get('lr', '-')} "
            f"{fields.get('tps', '-')} tok/s{eta}",
            file=sys.stderr,
            flush=True,
        )

    def stop(self) -> None:
        pass

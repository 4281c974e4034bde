"""Progress bars whose ETA always shows: the mean time per step (or prompt) so far times what is
left. rich's own TimeRemainingColumn estimates speed over a 30-second window and shows
`-:--:--` until two updates fall inside one, which slow steps (a minute of CPU SFT) never do."""

from __future__ import annotations

import time

from rich.progress import ProgressColumn, Task
from rich.text import Text


def eta_seconds(elapsed: float, done: int, remaining: float) -> float | None:
    """Seconds left at the mean rate so far; None before anything is done."""
    return None if done <= 0 else elapsed / done * max(0.0, remaining)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "eta -:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"eta {hours}:{minutes:02d}:{secs:02d}"


class MeanRateEta(ProgressColumn):
    """``eta h:mm:ss`` from the task's mean rate since it started. A task resumed part-way
    passes ``first=`` (its starting count) to ``add_task``: earlier work took none of this time."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("first", 0)
        remaining = (task.total or 0) - task.completed
        return Text(format_eta(eta_seconds(task.elapsed or 0.0, int(done), remaining)), style="progress.remaining")


def columns() -> tuple[ProgressColumn, ...]:
    """Description, bar, n/total, elapsed, eta: the columns of every bar rlhfkit shows."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            MeanRateEta())


class Progress:
    """A rich progress bar with ETA and live metrics on the main process; silent elsewhere."""

    def __init__(self, total: int, start: int, description: str, enabled: bool):
        self.bar = None
        self.t0, self.start = time.perf_counter(), start
        if not enabled:
            return
        from rich.progress import Progress as RichProgress
        from rich.progress import TextColumn


        self.bar = RichProgress(*columns(), TextColumn("{task.fields[info]}"))
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=start, first=start, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()

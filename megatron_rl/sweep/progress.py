"""The sweep's progress on the console: run i/N, the current run's step, and an ETA for the whole grid.

A rich progress bar when stdout is a terminal (as tracking.py shows a run's steps); otherwise one plain line
per event (a run starting or skipped, a step logged), for logs that are not a terminal.

ETA: the work of a run is the samples it generates and trains on, data.train_steps x its samples per step
(data.rollout_batch_size x rollout.n_samples_per_prompt), so a grid whose runs differ in batch size (the
staleness study: N x 32 prompts per step, 144 / N steps) is estimated by its cost, not by its step count. With
`elapsed` seconds since the first run of this invocation started and `done` of the `total` samples of its runs
(a run that ends early counts as done), eta = elapsed * (total - done) / done. Start-up time of the runs is in
`elapsed`, so it is spread over the samples; before the first step there is no estimate.
"""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left for `total - done` samples at the mean pace of the `done` so far; None while done is 0."""
    if done <= 0:
        return None
    return elapsed * (total - done) / done


def format_duration(seconds: float | None) -> str:
    """`?`, `42s`, `5m03s` or `2h07m`."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SweepProgress:
    """Progress over the runs this invocation launches (`total_samples` samples in all) of `total_runs` in the
    grid."""

    def __init__(self, total_runs: int, total_samples: int, *, rich_bar: bool | None = None):
        self.total_runs, self.total_samples = total_runs, total_samples
        self._ended_samples = self._run_steps = self._run_total = self._samples_per_step = 0
        self._run_label = ""
        self._start: float | None = None
        use_bar = sys.stdout.isatty() if rich_bar is None else rich_bar
        self._bar = _Bar(self.total_samples) if use_bar else None

    @property
    def done(self) -> int:
        """Samples done: those of the ended runs and of the current run's logged steps."""
        return self._ended_samples + self._run_steps * self._samples_per_step

    def eta(self) -> float | None:
        elapsed = 0.0 if self._start is None else time.monotonic() - self._start
        return eta_seconds(elapsed, self.done, self.total_samples)

    def start_run(self, index: int, name: str, steps: int, samples_per_step: int) -> None:
        """Run `index` (1-based, its place in the grid) of `steps` training steps of `samples_per_step` starts."""
        self._start = time.monotonic() if self._start is None else self._start
        self._run_label, self._run_steps, self._run_total = f"run {index}/{self.total_runs} {name}", 0, steps
        self._samples_per_step = samples_per_step
        self._show(f"{self._run_label}: started")

    def step(self, steps: int) -> None:
        """The current run has logged `steps` steps."""
        self._run_steps = min(steps, self._run_total)
        self._show(f"{self._run_label}: step {steps}/{self._run_total}")

    def end_run(self) -> None:
        self._ended_samples += self._run_total * self._samples_per_step
        self._run_steps = 0

    def print(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        if self._bar is not None:
            self._bar.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _show(self, status: str) -> None:
        eta = format_duration(self.eta())
        if self._bar is not None:
            self._bar.update(self.done, status, eta)
        else:
            print(f"sweep: {status}, eta {eta}", flush=True)


class _Bar:
    def __init__(self, total_samples: int):
        self._progress = Progress(TextColumn("sweep"), BarColumn(), TimeElapsedColumn(),
                                  TextColumn("eta {task.fields[eta]}"), TextColumn("{task.fields[status]}"),
                                  console=Console(), refresh_per_second=2)
        self._task = self._progress.add_task("sweep", total=total_samples, status="", eta="?")
        self._progress.start()

    def update(self, done: int, status: str, eta: str) -> None:
        self._progress.update(self._task, completed=done, status=status, eta=eta)
        self._progress.refresh()

    def print(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._progress.stop()

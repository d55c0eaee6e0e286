"""Where the RL loop's metrics go: wandb, a JSONL file and the console.

One `Tracker` per process; only rank 0 has `enabled=True`, every other rank's tracker writes and
prints nothing (it still refuses a bad call, so all ranks fail at the same `log`).

- wandb: `tracking.wandb_mode` online / offline / disabled, passed to `wandb.init` as is (the
  WANDB_MODE variable cannot override it). The run lives under `run_dir/wandb/`, is named
  `tracking.run_name` (null: the name of run_dir) and its config is the full run config. Offline
  runs are uploaded later with `wandb sync <dir>` and read back with
  `megatron_rl.wandb_reader.read_wandb_run`. wandb does not capture the console (the progress bar
  would end up in its log). `finish` waits for wandb-core to write the run out (`run.finish()`
  alone can return before it has, under load): the run file is complete when it returns. That
  also ends any other wandb run of the process.
- JSONL (`tracking.jsonl_path`, relative to run_dir): one line per `log` call, appended and
  flushed to disk before `log` returns, so a crash loses at most the line being written:

      {"step": 7, "time": 1795320000.25, "train/loss": 0.5, "rollout/reward_mean": null,
       "nonfinite": {"rollout/reward_mean": "nan"}}

  `time` is Unix seconds. The file is strict JSON: a NaN or +-inf value is written as null and
  named in "nonfinite" ("nan", "inf" or "-inf"), a key present only when some value is not finite;
  `read_metrics_jsonl` restores the floats. wandb gets the non-finite floats themselves.
- console: a rich progress bar over `total_steps` with the key metrics when stdout is a
  terminal; otherwise one plain line per step (CI logs). `console()` prints a line above the bar.

`step` counts finished training steps: log step k after the k-th step (1-based, as checkpoints
count); steps must increase from one `log` call to the next.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megatron_rl.config.sections import TrackingConfig

METRIC_PREFIXES = ("rollout/", "train/", "mismatch/", "perf/", "sync/")
PROGRESS_METRICS = ("rollout/reward_mean", "train/loss", "perf/step_seconds")
_NONFINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Tracker:
    """Sends each step's metrics to wandb, the JSONL file and the console; a context manager."""

    def __init__(self, config: TrackingConfig, run_config: dict, *, enabled: bool = True,
                 total_steps: int | None = None, run_dir: str | Path):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb_mode = config.wandb_mode
        self._last_step: int | None = None
        self._wandb_run = self._jsonl = self._display = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb_run = _start_wandb(config, run_config, self.run_dir)
        try:
            self._display = _ProgressBar(total_steps) if sys.stdout.isatty() else _PlainLines(total_steps)
            if config.jsonl_path:
                self._jsonl = _open_jsonl(self.run_dir / config.jsonl_path, self.console)
        except BaseException:
            self.finish(exit_code=1)
            raise
        if self._wandb_run is not None and self._wandb_mode == "online":
            self.console(f"wandb: {self._wandb_run.url}")

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run's directory (holding run-<id>.wandb), or None without a wandb run."""
        return Path(self._wandb_run.dir).parent if self._wandb_run is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of `step`. Values are ints, floats or 0-dim tensors / numpy scalars.

        Raises ValueError, before anything is written, for a name without one of METRIC_PREFIXES,
        a value that is not a real number, or a step that does not increase.
        """
        _check_step(step, self._last_step)
        for name in metrics:
            _check_name(name)
        if not self.enabled:
            self._last_step = step
            return
        if self._display is None:
            raise RuntimeError(f"Tracker.log(step={step}) after finish()")
        values = {name: _to_number(name, value) for name, value in metrics.items()}
        self._last_step = step
        if self._jsonl is not None:
            _write_line(self._jsonl, step, values)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(values, step=step)
            except ConnectionError as error:
                self._lose_wandb(error)
        self._display.step(step, {name: values[name] for name in PROGRESS_METRICS if name in values})

    def console(self, message: str) -> None:
        """Print a line on rank 0's console (above the progress bar)."""
        if self._display is not None:
            self._display.print(message)

    def _lose_wandb(self, error: ConnectionError) -> None:
        """wandb-core has stopped (on a Slurm requeue every process of the job gets the signal): go on with the
        JSONL only; the run file keeps what wandb-core had received."""
        import wandb

        self._wandb_run = None
        self.console(f"wandb: wandb-core has stopped ({error!r}); metrics go to the JSONL only from here on")
        with contextlib.suppress(ConnectionError):
            wandb.teardown()  # unregisters wandb's exit hook, which would fail the same way

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def finish(self, exit_code: int = 0) -> None:
        """Close the wandb run (exit_code != 0 marks it failed), the JSONL file and the progress bar."""
        wandb_dir = self.wandb_dir
        if self._wandb_run is not None:
            import wandb

            try:
                self._wandb_run.finish(exit_code=exit_code)
                wandb.teardown()  # finish() returns before wandb-core has written the run file out; this waits
            except ConnectionError as error:
                self._lose_wandb(error)
            else:
                self._wandb_run = None
                if self._wandb_mode == "offline":
                    self.console(f"wandb: offline run saved; upload it with `wandb sync {wandb_dir}`")
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._display is not None:
            self._display.close()
            self._display = None


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """The lines of a metrics JSONL file, with the non-finite values restored as floats."""
    rows = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        row.update({name: _NONFINITE_NAMES[kind] for name, kind in row.pop("nonfinite", {}).items()})
        rows.append(row)
    return rows


def _start_wandb(config: TrackingConfig, run_config: dict, run_dir: Path):
    """A wandb run in config.wandb_mode under run_dir, or None when wandb is disabled."""
    if config.wandb_mode == "disabled":
        return None
    import wandb  # only when used: the import takes about half a second

    try:
        return wandb.init(mode=config.wandb_mode, dir=run_dir, project=config.wandb_project,
                          name=config.run_name or run_dir.name,
                          config=run_config, settings=wandb.Settings(console="off", silent=True))
    except wandb.errors.Error as error:
        if config.wandb_mode != "online":
            raise
        raise RuntimeError(f"wandb could not start an online run ({type(error).__name__}: {error}). Without "
                           f"network access or a wandb login, set tracking.wandb_mode=offline (upload later with "
                           f"`wandb sync`) or tracking.wandb_mode=disabled") from error


def _check_step(step: int, last_step: int | None) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if last_step is not None and step <= last_step:
        raise ValueError(f"step must increase from one log call to the next: got {step} after {last_step}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not any(name.startswith(p) and len(name) > len(p) for p in METRIC_PREFIXES):
        raise ValueError(f"metric {name!r} must be a name starting with one of {', '.join(METRIC_PREFIXES)}")


def _to_number(name: str, value: Any) -> int | float:
    """An int or float from an int, a float, or a 0-dim tensor / numpy scalar."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        shape = getattr(value, "shape", None)
        raise ValueError(f"metric {name!r} must be an int, a float or a 0-dim tensor, got {type(value).__name__}"
                         + (f" of shape {tuple(shape)}" if shape is not None else f" {value!r}"))
    return value


def _open_jsonl(path: Path, console: Callable[[str], None]):
    """Open for appending, after cutting off a last line left unfinished by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open("rb+") as existing:
            data = existing.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                existing.truncate(end)
                console(f"{path}: removed an unfinished last line ({len(data) - end} bytes) left by a crash")
    return path.open("a", encoding="utf-8")


def _write_line(file, step: int, values: Mapping[str, int | float]) -> None:
    nonfinite = {name: _nonfinite_name(value) for name, value in values.items() if not math.isfinite(value)}
    line = {"step": step, "time": time.time(), **{name: None if name in nonfinite else value
                                                  for name, value in values.items()}}
    if nonfinite:
        line["nonfinite"] = nonfinite
    file.write(json.dumps(line, allow_nan=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _format_metrics(metrics: Mapping[str, int | float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in metrics.items())


class _ProgressBar:
    """A rich progress bar over the run's steps, showing the latest key metrics."""

    def __init__(self, total_steps: int | None):
        self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                                  console=Console(), refresh_per_second=2)
        self._task = self._progress.add_task("train", total=total_steps, metrics="")
        self._first = True
        self._progress.start()

    def step(self, step: int, metrics: Mapping[str, int | float]) -> None:
        if self._first:  # a resumed run starts at its checkpoint's step: no speed sample for the jump there
            self._progress.reset(self._task, completed=step - 1 if step > 0 else 0)
            self._first = False
        self._progress.update(self._task, completed=step, metrics=_format_metrics(metrics))
        self._progress.refresh()

    def print(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._progress.stop()


class _PlainLines:
    """One line per step on stdout, for logs that are not a terminal."""

    def __init__(self, total_steps: int | None):
        self._of_total = f"/{total_steps}" if total_steps is not None else ""

    def step(self, step: int, metrics: Mapping[str, int | float]) -> None:
        self.print(f"step {step}{self._of_total}  {_format_metrics(metrics)}".rstrip())

    def print(self, message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        pass

"""One run's directory under the sweep directory, and what it says about the run.

    DIR/<run name>/config.yaml     the resolved config the run was started with (every key)
                  run.log          torchrun's and the trainer's output
                  metrics.jsonl    tracking.jsonl_path: one row per training step
                  wandb/           the wandb run (offline in the quickstart)
                  engines/         the rollout servers' logs
                  checkpoints/     checkpoint.dir
                  finished.json    the marker: written only after the run exited 0 with a metrics row for
                                   every one of data.train_steps steps

A directory without the marker holds an unfinished (crashed, killed, failed) run: it is cleared before
the run starts again, so nothing half-written is mistaken for a result.

Rewards: `final` is rollout/reward_mean of the last step, `last_10pct` its mean over the last
ceil(10 %) of the steps (at least one).
"""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.files import write_atomically
from megatron_rl.tracking import read_metrics_jsonl

REWARD_METRIC = "rollout/reward_mean"
METRICS_FILE = "metrics.jsonl"
MARKER_FILE = "finished.json"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "run.log"

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_FILE

    def marker(self) -> dict | None:
        """The marker's record ({"wall_seconds", "steps"}), or None for a run not finished."""
        try:
            return json.loads(self.marker_path.read_text())
        except FileNotFoundError:
            return None

    def mark_finished(self, wall_seconds: float, steps: int) -> None:
        """Write the marker (atomically: a crash leaves no marker or a whole one)."""
        record = {"wall_seconds": wall_seconds, "steps": steps}
        write_atomically(self.marker_path, json.dumps(record, indent=1) + "\n")

    def clear(self) -> None:
        """Remove everything an earlier, unfinished attempt left; leave an empty directory."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def steps_logged(self) -> int:
        """How many metric rows the run has written so far (0 without a metrics file)."""
        try:
            return sum(1 for line in self.metrics_path.read_text().splitlines() if line.endswith("}"))
        except FileNotFoundError:
            return 0

    def rewards(self) -> list[float]:
        """rollout/reward_mean of every logged step, in step order (NaN where a step had no groups)."""
        if not self.metrics_path.exists():
            return []
        return [row.get(REWARD_METRIC, math.nan) for row in read_metrics_jsonl(self.metrics_path)]

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def reward_summary(rewards: list[float]) -> dict[str, float | None]:
    """{"final": the last step's reward, "last_10pct": the mean over the last ceil(10 %) of the steps}."""
    if not rewards:
        return {"final": None, "last_10pct": None}
    tail = rewards[-max(1, math.ceil(0.1 * len(rewards))):]
    return {"final": rewards[-1], "last_10pct": sum(tail) / len(tail)}

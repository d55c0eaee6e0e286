"""DIR/sweep.json, the machine-readable summary of a sweep, rewritten after every run:

    {"command": "megatron-rl sweep ...", "config": "configs/quickstart.yaml", "overrides": ["data.train_steps=2"],
     "grid": {"algorithm.loss": ["kpo", "vespo"]}, "seeds": [0, 1],
     "runs": [{"name": "algorithm.loss=kpo__seed=0", "dir": "/abs/DIR/algorithm.loss=kpo__seed=0",
               "grid_point": {"algorithm.loss": "kpo"}, "seed": 0, "train_steps": 2,
               "status": "finished",            # or "failed", or "pending" (not run, or interrupted)
               "reused": false,                 # finished by an earlier invocation, skipped by this one
               "exit_code": 0, "wall_seconds": 41.2, "steps": 2,
               "reward_final": 0.04, "reward_last_10pct": 0.04,   # null without metrics (or a NaN reward)
               "error": null},                  # why a run failed, in words
              ...]}

Runs are listed in the order they run (seed-major). Grid values are the texts given to --grid.
"""

import json
import math
from pathlib import Path

from megatron_rl.files import write_atomically

SUMMARY_FILE = "sweep.json"


def write_summary(out_dir: Path, summary: dict) -> None:
    """Write DIR/sweep.json atomically (a reader never sees half a file); NaN and inf are written as null."""
    path = out_dir / SUMMARY_FILE
    write_atomically(path, json.dumps(_finite_or_null(summary), indent=1, allow_nan=False) + "\n")


def read_summary(out_dir: str | Path) -> dict:
    path = Path(out_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no sweep summary (is {out_dir} the --out directory of a sweep?)") from None


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value

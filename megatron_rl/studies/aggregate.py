"""A sweep's finished runs, grouped by grid point, with statistics over seeds.

For a grid point with finished seeds s = 1..S and reward curves r_s(t) (rollout/reward_mean of step t):

    mean(t) = (1/S) sum_s r_s(t),   low(t) = min_s r_s(t),   high(t) = max_s r_s(t)

over the steps t logged by every one of its seeds. Each seed's reward_final (the last step's) and
reward_last_10pct (the mean over the last ceil(10 %) of steps), from sweep.json, are summarised by the same
mean / min / max.
Failed and pending runs are left out (and counted).
"""

from dataclasses import dataclass
from pathlib import Path

from megatron_rl.sweep.grid import point_label
from megatron_rl.sweep.run_dir import METRICS_FILE, REWARD_METRIC
from megatron_rl.tracking import read_metrics_jsonl


@dataclass(frozen=True)
class Spread:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class PointResult:
    """One grid point: its label, its finished seeds, curves over common steps, final rewards."""

    label: str
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    curve: tuple[Spread, ...]  # one per step of `steps`
    final: Spread | None  # reward_final over seeds; None without a finished seed
    last_10pct: Spread | None  # reward_last_10pct over seeds
    last_10pct_values: tuple[float, ...]  # each finished seed's reward_last_10pct
    wall_seconds: float | None  # mean over finished seeds
    not_finished: int  # failed or pending runs of this point


def spread(values: list[float]) -> Spread:
    return Spread(sum(values) / len(values), min(values), max(values))


def _spread_or_none(values: list[float]) -> Spread | None:
    return spread(values) if values else None


def aggregate(summary: dict) -> list[PointResult]:
    """The grid points of a sweep summary (sweep.json), in the order they first appear."""
    by_point: dict[str, list[dict]] = {}
    for run in summary["runs"]:
        by_point.setdefault(point_label(run["grid_point"].items()), []).append(run)
    return [_point(label, runs) for label, runs in by_point.items()]


def _point(label: str, runs: list[dict]) -> PointResult:
    finished = [run for run in runs if run["status"] == "finished"]
    curves = [_reward_by_step(Path(run["dir"]) / METRICS_FILE) for run in finished]
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    finals, tails, walls = ([run[key] for run in finished if run[key] is not None]
                            for key in ("reward_final", "reward_last_10pct", "wall_seconds"))
    return PointResult(label, tuple(run["seed"] for run in finished), tuple(steps),
                       tuple(spread([curve[step] for curve in curves]) for step in steps),
                       _spread_or_none(finals), _spread_or_none(tails), tuple(tails),
                       sum(walls) / len(walls) if walls else None, len(runs) - len(finished))


def _reward_by_step(metrics_path: Path) -> dict[int, float]:
    return {row["step"]: row[REWARD_METRIC] for row in read_metrics_jsonl(metrics_path) if REWARD_METRIC in row}

"""A sweep's finished runs, grouped by grid point, with statistics over seeds.

For a grid point with finished seeds s = 1..S and reward curves r_s(t) (rollout/reward_mean of step t):

    mean(t) = (1/S) sum_s r_s(t),   low(t) = min_s r_s(t),   high(t) = max_s r_s(t)

over the steps t logged by every one of its seeds. Each seed's reward_final (the last step's) and
reward_last_10pct (the mean over the last ceil(10 %) of steps), from sweep.json, are summarised by the same
mean / min / max.
Failed and pending runs are left out (and counted). `metric_curves` gives the same mean / min / max curves
for any per-step metric of the runs' metrics.jsonl.
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
    grid_point: dict[str, str]  # grid key -> value text
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


@dataclass(frozen=True)
class Curve:
    """A metric of one grid point per step: mean / min / max over its finished seeds."""

    label: str
    grid_point: dict[str, str]
    steps: tuple[int, ...]  # the steps at which every finished seed logged the metric
    values: tuple[Spread, ...]  # one per step


def aggregate(summary: dict) -> list[PointResult]:
    """The grid points of a sweep summary (sweep.json), in the order they first appear."""
    return [_point(label, runs) for label, runs in _runs_by_point(summary).items()]


def metric_curves(summary: dict, metric: str) -> list[Curve]:
    """`metric` per step for each grid point of the sweep summary (a point whose runs never log it: no steps)."""
    curves = []
    for label, runs in _runs_by_point(summary).items():
        steps, values = _curve([run for run in runs if run["status"] == "finished"], metric)
        curves.append(Curve(label, dict(runs[0]["grid_point"]), steps, values))
    return curves


def metric_means(summary: dict, metric: str) -> dict[str, Spread | None]:
    """Per grid point label: each finished seed's mean of `metric` over the steps that logged it, as mean / min /
    max over those seeds (None: no seed logged it)."""
    means = {}
    for label, runs in _runs_by_point(summary).items():
        per_seed = [_metric_by_step(Path(run["dir"]) / METRICS_FILE, metric)
                    for run in runs if run["status"] == "finished"]
        means[label] = _spread_or_none([sum(values.values()) / len(values) for values in per_seed if values])
    return means


def _runs_by_point(summary: dict) -> dict[str, list[dict]]:
    by_point: dict[str, list[dict]] = {}
    for run in summary["runs"]:
        by_point.setdefault(point_label(run["grid_point"].items()), []).append(run)
    return by_point


def _point(label: str, runs: list[dict]) -> PointResult:
    finished = [run for run in runs if run["status"] == "finished"]
    steps, curve = _curve(finished, REWARD_METRIC)
    finals, tails, walls = ([run[key] for run in finished if run[key] is not None]
                            for key in ("reward_final", "reward_last_10pct", "wall_seconds"))
    return PointResult(label, dict(runs[0]["grid_point"]), tuple(run["seed"] for run in finished), steps, curve,
                       _spread_or_none(finals), _spread_or_none(tails), tuple(tails),
                       sum(walls) / len(walls) if walls else None, len(runs) - len(finished))


def _curve(finished: list[dict], metric: str) -> tuple[tuple[int, ...], tuple[Spread, ...]]:
    by_run = [_metric_by_step(Path(run["dir"]) / METRICS_FILE, metric) for run in finished]
    steps = sorted(set.intersection(*(set(values) for values in by_run))) if by_run else []
    return tuple(steps), tuple(spread([values[step] for values in by_run]) for step in steps)


def _metric_by_step(metrics_path: Path, metric: str) -> dict[int, float]:
    return {row["step"]: row[metric] for row in read_metrics_jsonl(metrics_path) if row.get(metric) is not None}

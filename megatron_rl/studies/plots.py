"""The sweep report's two figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- reward curves: per grid point, the mean over seeds of rollout/reward_mean per step, with a band from the
  min to the max over seeds;
- final reward: per grid point, a bar at the mean over seeds of the reward over the last 10 % of steps, an
  error bar from the min to the max, and a dot per seed.
"""

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from megatron_rl.studies.aggregate import PointResult

WIDTH, HEIGHT, DPI = 7.0, 4.0, 110


def plot_reward_curves(points: list[PointResult], path: Path, title: str) -> Path:
    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    for point in points:
        if not point.steps:
            continue
        seeds = f"{len(point.seeds)} seed{'s' if len(point.seeds) > 1 else ''}"
        line, = axes.plot(point.steps, [s.mean for s in point.curve], label=f"{point.label} ({seeds})",
                          marker="o" if len(point.steps) < 20 else None)
        axes.fill_between(point.steps, [s.low for s in point.curve], [s.high for s in point.curve],
                          color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set(xlabel="step", ylabel="reward (rollout/reward_mean)", title=f"{title}: mean over seeds, min-max band")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    figure.savefig(path)
    return path


def plot_final_rewards(points: list[PointResult], path: Path, title: str) -> Path:
    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    shown = [point for point in points if point.last_10pct is not None]
    positions = range(len(shown))
    means, lows, highs = ([getattr(p.last_10pct, name) for p in shown] for name in ("mean", "low", "high"))
    axes.bar(positions, means, color="tab:blue", alpha=0.6, capsize=6,
             yerr=[[m - low for m, low in zip(means, lows, strict=True)],
                   [high - m for m, high in zip(means, highs, strict=True)]])
    for position, point in zip(positions, shown, strict=True):
        axes.plot([position] * len(point.last_10pct_values), point.last_10pct_values, "k.", markersize=6)
    axes.set_xticks(list(positions), [p.label for p in shown], rotation=20, ha="right", fontsize="small")
    axes.set(ylabel="reward, mean of the last 10 % of steps", title=f"{title}: final reward (mean, min-max, seeds)")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path)
    return path

"""The reports' figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Generic:
- `plot_curves`: panels of curves y(x), each a mean over seeds with a band from the min to the max over seeds
  (`Series`), optionally on a log y axis;
- `plot_grid`: a heatmap of a value over a 2-D grid of settings (rows x columns), each cell annotated with
  the mean and the [min, max] over seeds.

The sweep report's two figures:
- reward curves: per grid point, the mean over seeds of rollout/reward_mean per step, with a min-max band;
- final reward: per grid point, a bar at the mean over seeds of the reward over the last 10 % of steps, an
  error bar from the min to the max, and a dot per seed.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from megatron_rl.studies.aggregate import PointResult, Spread

WIDTH, HEIGHT, DPI = 7.0, 4.0, 110
MARKERS_BELOW = 20  # curves with fewer points get a marker on each


@dataclass(frozen=True)
class Series:
    """One curve: its legend label, x values and a Spread per x; `dashed` draws it dashed, `color` fixes
    its colour (e.g. raw and filtered values of one setting in one colour)."""

    label: str
    x: Sequence[float]
    values: Sequence[Spread]
    dashed: bool = False
    color: str | None = None


def plot_curves(panels: Sequence[tuple[str, Sequence[Series]]], path: Path, title: str, xlabel: str, ylabel: str,
                *, log_y: bool = False, columns: int = 3) -> Path:
    """Panels (panel title, series) side by side, `columns` per row; empty series are skipped."""
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(WIDTH if columns == 1 else 4.2 * columns, HEIGHT if rows == 1 else 3.4 * rows),
                    dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for axes, (panel_title, series) in zip(grid.flat, panels, strict=False):
        for curve in series:
            if not curve.x:
                continue
            marker = "o" if len(curve.x) < MARKERS_BELOW else None
            line, = axes.plot(curve.x, [s.mean for s in curve.values], "--" if curve.dashed else "-",
                              color=curve.color, label=curve.label, marker=marker, markersize=3)
            axes.fill_between(curve.x, [s.low for s in curve.values], [s.high for s in curve.values],
                              color=line.get_color(), alpha=0.15, linewidth=0)
        axes.set(xlabel=xlabel, title=panel_title)
        axes.set_yscale("log" if log_y else "linear")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="x-small")
    for axes in grid[:, 0]:
        axes.set_ylabel(ylabel)
    for axes in grid.flat[len(panels):]:
        axes.set_visible(False)
    figure.suptitle(f"{title}: mean over seeds, min-max band")
    figure.savefig(path)
    return path


def plot_grid(rows: Sequence[str], columns: Sequence[str], cells: dict[tuple[str, str], Spread | None], path: Path,
              title: str, row_label: str, column_label: str) -> Path:
    """A heatmap of cells[(row, column)].mean, each cell annotated `mean [min, max]`; missing cells blank."""
    figure = Figure(figsize=(max(WIDTH, 1.6 * len(columns) + 2), max(2.5, 0.7 * len(rows) + 1.6)), dpi=DPI,
                    layout="constrained")
    axes = figure.add_subplot()
    means = [[cells[(r, c)].mean if cells.get((r, c)) else math.nan for c in columns] for r in rows]
    image = axes.imshow(means, cmap="viridis", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            cell = cells.get((r, c))
            text = f"{cell.mean:.3f}\n[{cell.low:.3f}, {cell.high:.3f}]" if cell else "no run"
            axes.text(j, i, text, ha="center", va="center", fontsize="small", color="white",
                      bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0})
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(rows)), rows)
    axes.set(xlabel=column_label, ylabel=row_label, title=f"{title}: mean [min, max] over seeds")
    figure.colorbar(image, ax=axes)
    figure.savefig(path)
    return path


def plot_reward_curves(points: list[PointResult], path: Path, title: str) -> Path:
    series = [Series(f"{point.label} ({len(point.seeds)} seed{'s' if len(point.seeds) > 1 else ''})",
                     point.steps, point.curve) for point in points]
    return plot_curves([("", series)], path, title, "step", "reward (rollout/reward_mean)")


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

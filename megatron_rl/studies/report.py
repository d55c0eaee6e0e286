"""DIR/report.md: a sweep's results in markdown, with its two PNGs beside it.

    megatron-rl report DIR          # also written at the end of every `megatron-rl sweep`

The report states the exact command, the config file and overrides, the grid and the seeds; a table per
grid point (finished seeds, final reward and reward over the last 10 % of steps as mean [min, max] over
seeds, mean wall time); the figures (plots.py); the runs that failed or did not run; and the resolved
config of the first finished run (the others differ from it only in the grid keys, data.seed, their
directories and their engine ports).
"""

from pathlib import Path

from megatron_rl.studies.aggregate import PointResult, Spread, aggregate
from megatron_rl.studies.plots import plot_final_rewards, plot_reward_curves
from megatron_rl.sweep.summary import read_summary

REPORT_FILE = "report.md"
CURVES_FILE = "reward_curves.png"
FINALS_FILE = "final_reward.png"


def write_report(sweep_dir: str | Path) -> Path:
    """Draw the figures and write the report of the sweep in `sweep_dir`; the report's path."""
    sweep_dir = Path(sweep_dir)
    summary = read_summary(sweep_dir)
    points = aggregate(summary)
    title = sweep_dir.resolve().name
    plot_reward_curves(points, sweep_dir / CURVES_FILE, title)
    plot_final_rewards(points, sweep_dir / FINALS_FILE, title)
    path = sweep_dir / REPORT_FILE
    path.write_text(report_markdown(summary, points, title))
    return path


def report_markdown(summary: dict, points: list[PointResult], title: str) -> str:
    runs = summary["runs"]
    finished = [run for run in runs if run["status"] == "finished"]
    grid = summary["grid"]
    lines = [
        f"# Sweep {title}", "",
        "```bash", summary["command"] or "(command not recorded)", "```", "",
        f"- config: `{summary['config']}`",
        f"- overrides for every run: {_code_list(summary['overrides']) or 'none'}",
        *(f"- grid: `{key}` = {_code_list(values)}" for key, values in grid.items()),
        *(f"  - `{value}`: {_code_list(overrides) or 'the base config'}"
          for variants in summary.get("variants", {}).values() for value, overrides in variants.items()),
        f"- seeds (data.seed): {', '.join(map(str, summary['seeds']))}",
        f"- runs: {len(runs)}, finished {len(finished)}, failed "
        f"{sum(run['status'] == 'failed' for run in runs)}, not run {sum(run['status'] == 'pending' for run in runs)}",
        "",
        "| grid point | finished seeds | final reward | reward, last 10 % of steps | wall time (mean) |",
        "|---|---|---|---|---|",
        *(_table_row(point) for point in points), "",
        "Rewards are rollout/reward_mean, as mean [min, max] over the finished seeds.", "",
        f"![reward curves]({CURVES_FILE})", "",
        f"![final reward]({FINALS_FILE})", "",
    ]
    problems = [run for run in runs if run["status"] != "finished"]
    if problems:
        lines += ["## Runs not finished", ""]
        lines += [f"- `{run['name']}`: {run['status']}" + (f" ({run['error']})" if run["error"] else "")
                  for run in problems]
        lines.append("")
    if finished:
        config = (Path(finished[0]["dir"]) / "config.yaml").read_text()
        lines += ["## Settings", "", f"The resolved config of `{finished[0]['name']}`; the other runs differ in the "
                  "grid keys, data.seed, their directories and their engine ports.", "", "```yaml", config.rstrip(),
                  "```", ""]
    return "\n".join(lines)


def _table_row(point: PointResult) -> str:
    wall = f"{point.wall_seconds:.1f} s" if point.wall_seconds is not None else "-"
    seeds = ", ".join(map(str, point.seeds)) or "none"
    return f"| {point.label} | {seeds} | {format_spread(point.final)} | {format_spread(point.last_10pct)} | {wall} |"


def format_spread(value: Spread | None, spec: str = ".3f") -> str:
    """`mean [min, max]`, each formatted by `spec` (default: 3 decimals), or `-`."""
    return "-" if value is None else f"{value.mean:{spec}} [{value.low:{spec}}, {value.high:{spec}}]"


def _code_list(values: list[str]) -> str:
    return ", ".join(f"`{value}`" for value in values)

"""REPORT_DIR/<study>.md: a study's report, its figures in REPORT_DIR/<study>/.

The report states how the study was run (the exact command, base config, every run's overrides, the grid with
each variant's overrides, the seeds, the train steps, the finished and failed runs, the measured wall time on
this machine and the estimate for the full study), the papers' claim and the design (full runs only), then the
study's tables (`Study.findings`: numbers measured by the runs, nothing else) and figures. The reading of the
results is written by hand in REPORT_DIR/<study>.discussion.md and appended as "Discussion", so that writing
the report again (a resumed or extended sweep) keeps it. A smoke run's report opens by saying that it is one and
that its numbers support no conclusion.

`point_table` is the tables' common form: one row per grid point, a column per metric, each cell the mean
[min, max] over seeds of a per-seed value.
"""

import os
from collections.abc import Callable
from pathlib import Path

from megatron_rl.studies.aggregate import Spread, aggregate
from megatron_rl.studies.report import format_spread
from megatron_rl.studies.study import SMOKE_STEPS, Study, StudyRun
from megatron_rl.sweep.summary import read_summary

DISCUSSION_SUFFIX = ".discussion.md"
SMOKE_NOTICE = (f"**Smoke run** ({SMOKE_STEPS} steps per run, one seed, a reduced grid): it shows that the study "
                "runs end to end and produces its figures. Its numbers are not results and support no conclusion "
                "about the methods.")


def write_study_report(study: Study, run: StudyRun) -> Path:
    """Draw the study's figures and write its report; the report's path."""
    summary = read_summary(run.out)
    figure_dir = run.report_dir / study.name
    figure_dir.mkdir(parents=True, exist_ok=True)
    figures = study.figures(summary, figure_dir)
    path = run.report_dir / f"{study.name}.md"
    lines = [f"# {study.title}{' (smoke run)' if run.smoke else ''}", ""]
    if run.smoke:
        lines += [SMOKE_NOTICE, ""]
    lines += _how_it_was_run(study, run, summary, path.parent)
    if not run.smoke:
        lines += ["## What the papers report", "", study.claim, ""]
    lines += [f"## Design{' of the full study' if run.smoke else ''}", "", study.design, "", "## Results", "",
              *study.findings(summary), ""]
    for figure in figures:
        lines += [f"![{figure.caption}]({study.name}/{figure.file})", "", f"*{figure.caption}*", ""]
    discussion = run.report_dir / f"{study.name}{DISCUSSION_SUFFIX}"
    if not run.smoke and discussion.is_file():
        lines += ["## Discussion", "", f"*Written by hand from the results above ({discussion.name}).*", "",
                  discussion.read_text().strip(), ""]
    path.write_text("\n".join(lines))
    return path


def _how_it_was_run(study: Study, run: StudyRun, summary: dict, report_dir: Path) -> list[str]:
    runs = summary["runs"]
    finished = [r for r in runs if r["status"] == "finished"]
    walls = [r["wall_seconds"] for r in finished if r["wall_seconds"] is not None]
    steps = sorted({r["train_steps"] for r in runs})
    lines = ["## How it was run", "", "```bash", run.command, "```", "",
             f"- base config: `{run.config}`; overrides for every run: {_codes(summary['overrides'])}"]
    for key, values in summary["grid"].items():
        variants = summary.get("variants", {}).get(key, {})
        lines.append(f"- grid `{key}`: {_codes(values)}")
        lines += [f"  - `{value}`: {_codes(overrides)}" for value, overrides in variants.items()]
    lines += [f"- seeds (data.seed): {', '.join(map(str, summary['seeds']))}",
              f"- train steps per run: {', '.join(map(str, steps))}",
              f"- runs: {len(runs)}; finished {len(finished)}, failed {sum(r['status'] == 'failed' for r in runs)}, "
              f"not run {sum(r['status'] == 'pending' for r in runs)}"]
    lines += [f"  - `{r['name']}`: {r['status']}" + (f" ({r['error']})" if r["error"] else "")
              for r in runs if r["status"] != "finished"]
    lines.append(f"- sweep directory: `{os.path.relpath(run.out.resolve(), report_dir.resolve())}` (relative to "
                 "this report; its report.md holds the resolved config of a run)")
    if walls:
        lines.append(f"- wall time on this machine (2 CPU cores, runs one after the other): {sum(walls) / 60:.1f} min "
                     f"in all, {min(walls):.0f}-{max(walls):.0f} s per run")
    if not run.smoke:
        lines.append(f"- estimated wall time of the full study: {study.estimate}")
    return [*lines, ""]


def reward_table(summary: dict) -> list[str]:
    """Per grid point: finished seeds, final reward and reward over the last 10 % of steps, mean wall time."""
    lines = ["| grid point | seeds | final reward | reward, last 10 % of steps | wall time per run |",
             "|---|---|---|---|---|"]
    for point in aggregate(summary):
        wall = f"{point.wall_seconds:.0f} s" if point.wall_seconds is not None else "-"
        lines.append(f"| {point.label} | {len(point.seeds)} | {format_spread(point.final)} | "
                     f"{format_spread(point.last_10pct)} | {wall} |")
    return [*lines, "", "Rewards are rollout/reward_mean, mean [min, max] over seeds.", ""]


def point_table(labels: list[str], columns: list[tuple[str, Callable[[str], Spread | None]]],
                spec: str = ".3g") -> list[str]:
    """Markdown rows: a row per label, a column per (header, label -> Spread or None)."""
    lines = ["| grid point | " + " | ".join(header for header, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(format_spread(value(label), spec) for _, value in columns) + " |"
              for label in labels]
    return lines


def _codes(values: list[str]) -> str:
    return ", ".join(f"`{value}`" for value in values) or "none"

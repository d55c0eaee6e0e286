"""A reproduction study: a named sweep of quickstart-style runs, its own figures, and a markdown report.

    megatron-rl study staleness [--smoke] [--seeds N] [--out DIR] [--report-dir DIR] [KEY=VALUE ...]

A `Study` gives the grid (named-variant axes, megatron_rl/sweep/grid.py), the overrides of every run and
the train steps; `run_study` runs that sweep on top of the base config (resumable: finished runs are kept),
writes the sweep's own report in its directory, then draws the study's figures into REPORT_DIR/<name>/ and
writes REPORT_DIR/<name>.md (study_report.py).

A smoke run (`--smoke`) checks the pipeline in minutes: SMOKE_STEPS steps per run, one seed, the study's
reduced grid (`smoke_values`), and its report says so. Its default sweep directory is runs/studies/<name>-smoke
and its report goes into that directory, never into docs/.
"""

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.sweep import SweepSpec, run_sweep
from megatron_rl.sweep.grid import GridAxis, GridError

SMOKE_STEPS = 2
SMOKE_SEEDS = 1
FULL_SEEDS = 3
DEFAULT_CONFIG = Path("configs/quickstart.yaml")
DEFAULT_OUT = Path("runs/studies")
DEFAULT_REPORT_DIR = Path("docs/results")
EVERY_RUN = ("checkpoint.save_interval=0",)  # a study reads metrics only: no checkpoints


@dataclass(frozen=True)
class FigureFile:
    file: str  # a PNG in the study's figure directory
    caption: str


def reward_figures(summary: dict, out: Path, per: str) -> list[FigureFile]:
    """Draw a study's reward curves and final-reward bars over its grid points ("reward per <per>")."""
    from megatron_rl.studies.aggregate import aggregate
    from megatron_rl.studies.plots import plot_final_rewards, plot_reward_curves

    points = aggregate(summary)
    plot_reward_curves(points, out / "reward_curves.png", f"reward per {per}")
    plot_final_rewards(points, out / "final_reward.png", f"reward per {per}")
    return [FigureFile("reward_curves.png", f"Reward per {per}, mean over seeds with a min-max band."),
            FigureFile("final_reward.png", f"Reward over the last 10 % of steps per {per}: mean, min-max, one dot "
                       "per seed.")]


FigureFunction = Callable[[dict, Path], list[FigureFile]]  # (sweep.json summary, figure directory) -> figures
FindingsFunction = Callable[[dict], list[str]]  # sweep.json summary -> markdown lines (tables, measured facts)
ConfigOverrides = Callable[[Path, tuple[str, ...]], tuple[str, ...]]  # (base config, user overrides) -> overrides


@dataclass(frozen=True)
class Study:
    """name: the CLI's NAME; axes(smoke): the grid; overrides: every run's; steps: data.train_steps of every
    run (None: an axis sets them); config_overrides: more overrides of every run, made from the base config and
    the user's overrides; smoke_values: axis key -> the values the smoke grid keeps; claim: what the
    papers report (markdown); design: what is run and why (markdown); estimate: the full study's expected
    wall time on the 2-core machine; figures and findings: the report's content from the sweep summary."""

    name: str
    title: str
    axes: tuple[GridAxis, ...]
    overrides: tuple[str, ...]
    steps: int | None
    smoke_values: dict[str, tuple[str, ...]]
    claim: str
    design: str
    estimate: str
    figures: FigureFunction
    findings: FindingsFunction
    config_overrides: ConfigOverrides | None = None  # every run's overrides that depend on the base config

    def grid(self, smoke: bool) -> tuple[GridAxis, ...]:
        """The axes of a full run, or those of a smoke run: the smoke values only, and without the variants'
        data.train_steps (a smoke run has SMOKE_STEPS steps)."""
        if not smoke:
            return self.axes
        return tuple(_smoke_axis(axis, self.smoke_values.get(axis.key, axis.values)) for axis in self.axes)

    def run_overrides(self, smoke: bool, config: Path, user_overrides: tuple[str, ...]) -> tuple[str, ...]:
        """Every run's overrides: the study's, then the user's (which win)."""
        steps = SMOKE_STEPS if smoke else self.steps
        derived = self.config_overrides(config, user_overrides) if self.config_overrides else ()
        return (*EVERY_RUN, *self.overrides, *derived, *((f"data.train_steps={steps}",) if steps is not None else ()),
                *user_overrides)


def _smoke_axis(axis: GridAxis, values: tuple[str, ...]) -> GridAxis:
    unknown = [value for value in values if value not in axis.values]
    if unknown:
        raise GridError(f"axis {axis.key}: smoke values {unknown} are not among {list(axis.values)}")
    if axis.variants is None:
        return GridAxis(axis.key, values)
    keep = [tuple(text for text in axis.overrides(value) if not text.startswith("data.train_steps="))
            for value in values]
    return GridAxis(axis.key, values, tuple(keep))


@dataclass(frozen=True)
class StudyRun:
    """How a study is run: the command line's choices."""

    smoke: bool
    seeds: int
    out: Path
    report_dir: Path
    config: Path
    overrides: tuple[str, ...]
    command: str


def study_run(name: str, *, smoke: bool, seeds: int | None, out: str | None, report_dir: str | None,
              config: str | None, overrides: list[str]) -> StudyRun:
    """The defaults filled in, and the full command line that reproduces the run."""
    seeds = seeds or (SMOKE_SEEDS if smoke else FULL_SEEDS)
    out_path = Path(out) if out else DEFAULT_OUT / (f"{name}-smoke" if smoke else name)
    report_path = Path(report_dir) if report_dir else (out_path if smoke else DEFAULT_REPORT_DIR)
    config_path = Path(config) if config else DEFAULT_CONFIG
    command = shlex.join(["megatron-rl", "study", name, *(["--smoke"] if smoke else []), "--seeds", str(seeds),
                          "--out", str(out_path), "--report-dir", str(report_path), "--config", str(config_path),
                          *overrides])
    return StudyRun(smoke, seeds, out_path, report_path, config_path, tuple(overrides), command)


def run_study(study: Study, run: StudyRun) -> tuple[int, Path]:
    """Run the study's sweep, then write its reports; (the sweep's exit code, the study report's path)."""
    from megatron_rl.studies.report import write_report
    from megatron_rl.studies.study_report import write_study_report

    spec = SweepSpec(run.config, study.grid(run.smoke), run.seeds, run.out,
                     study.run_overrides(run.smoke, run.config, run.overrides), run.command)
    exit_code = run_sweep(spec)
    write_report(run.out)
    return exit_code, write_study_report(study, run)

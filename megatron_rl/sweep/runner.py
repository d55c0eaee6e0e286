"""A sweep: one short RL run per grid point and seed, one after the other, resumable.

    spec = SweepSpec(Path("configs/quickstart.yaml"), axes=[parse_grid_option("algorithm.loss=kpo,vespo")],
                     seeds=2, out=Path("runs/sweep"), overrides=("data.train_steps=20",))
    exit_code = run_sweep(spec)          # 0 when every run finished, 1 when any failed

1. Plan (`plan_sweep`), before anything runs: every run's config is loaded with the project's loader
   (config file + overrides + grid point + seed + the run's placement), and every error of every grid
   point is raised at once as a SweepError naming the grid point and the key.
2. Run: a finished run (run_dir.py's marker) is skipped if its config.yaml, read by today's loader, is the
   planned one (else planning fails, naming its directory); any other run's directory is cleared, its
   resolved config (with free engine ports) written to config.yaml, and `run_fn` trains it (started again, up
   to PORT_ATTEMPTS times, when another program took an engine port first: launch.py). A run that
   exits 0 with a metrics row for each of data.train_steps steps gets the marker; any other run is
   reported (name, exit code, the end of its log) and the sweep goes on. sweep.json is rewritten after
   every run.

Placement: tracking.dir = DIR and tracking.run_name = the run's name (so the metrics, the wandb run and the
servers' logs land in DIR/<name>/), checkpoint.dir = DIR/<name>/checkpoints, tracking.jsonl_path =
metrics.jsonl, checkpoint.resume = false (a restarted run starts from scratch). These keys and data.seed
belong to the sweep: setting them in the overrides or the grid is an error.

Seeds: data.seed is the one seed key of a run config, and the sweep sets it to the run's seed. It seeds the
prompt order (PromptSampler) and every learner RNG: Python's, NumPy's, torch's and Megatron's tracker
(parallel/state.initialize_parallel); anything else the trainer seeds must derive from it too. The initial
weights are model.hf_path's, whatever the seed.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.config import ConfigError, RunConfig, dump_config, load_config
from megatron_rl.sweep.grid import SEED_KEY, GridAxis, RunPoint, expand_grid
from megatron_rl.sweep.launch import launch_run, lost_port_race, with_free_engine_ports
from megatron_rl.sweep.progress import SweepProgress
from megatron_rl.sweep.run_dir import METRICS_FILE, RunDir, reward_summary
from megatron_rl.sweep.summary import SUMMARY_FILE, write_summary

SWEEP_KEYS = ("tracking.dir", "tracking.run_name", "tracking.jsonl_path", "checkpoint.dir", "checkpoint.resume",
              SEED_KEY)
LOG_TAIL_LINES = 20
PORT_ATTEMPTS = 3  # starts of a run whose engine port another program took between choosing and binding it

RunFunction = Callable[[RunDir, int, Callable[[int], None]], int]  # (run dir, world size, on_step) -> exit code


class SweepError(ValueError):
    """Everything wrong with a sweep's settings, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class SweepSpec:
    config: Path
    axes: tuple[GridAxis, ...]
    seeds: int
    out: Path
    overrides: tuple[str, ...] = ()
    command: str = ""  # the command line, for the summary and the report


@dataclass(frozen=True)
class PlannedRun:
    index: int  # 1-based place in the sweep
    point: RunPoint
    dir: RunDir
    config: RunConfig  # resolved; engine ports as configured (each launch picks free ones)

    def trained_as_planned(self) -> bool:
        """Whether the run's config.yaml (as launched), read by today's loader, is this plan's config, the launched
        engines' ports aside: a key added to the code since the run counts as its default, a default changed
        since as the value the run had."""
        try:
            launched = load_config(self.dir.config_path)
        except (ConfigError, OSError):
            return False
        return _without_launched_ports(launched) == _without_launched_ports(self.config)


@dataclass
class RunRecord:
    status: str = "pending"
    reused: bool = False
    exit_code: int | None = None
    wall_seconds: float | None = None
    error: str | None = None


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """Every run with its validated config; SweepError listing every problem (nothing has run yet)."""
    out = spec.out.resolve()
    set_keys = [("override", text.partition("=")[0].strip()) for text in spec.overrides]
    set_keys += [("--grid", key) for axis in spec.axes for key in axis.config_keys()]
    problems = [f"{where} {key}: set by the sweep for every run{' (use --seeds)' if key == SEED_KEY else ''}"
                for where, key in set_keys if any(k == key or k.startswith(f"{key}.") for k in SWEEP_KEYS)]
    if problems:
        raise SweepError(problems)
    planned, seen = [], set()
    for index, point in enumerate(expand_grid(list(spec.axes), spec.seeds), start=1):
        run_dir = RunDir(out / point.name)
        try:
            config = load_config(spec.config, [*spec.overrides, *point.overrides(), *_placement(out, run_dir)])
        except ConfigError as exc:
            for key, message in exc.errors:
                line = f"grid point {point.point_label}: {key}: {message}"
                if line not in seen:
                    seen.add(line)
                    problems.append(line)
            continue
        planned.append(PlannedRun(index, point, run_dir, config))
    problems += [f"{run.dir.path}: finished with other settings than this sweep gives it (config, overrides or "
                 f"defaults changed); remove that directory to run it again, or choose another --out"
                 for run in planned if run.dir.marker() is not None and not run.trained_as_planned()]
    if problems:
        raise SweepError(problems)
    return planned


def run_sweep(spec: SweepSpec, run_fn: RunFunction = launch_run, *, rich_bar: bool | None = None) -> int:
    """Run every planned run not finished yet; 0 when all are finished, 1 when any failed."""
    planned = plan_sweep(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    records = {run.point.name: _earlier_record(run) for run in planned}
    samples_to_run = sum(run.config.data.train_steps * _samples_per_step(run.config) for run in planned
                         if not records[run.point.name].reused)
    progress = SweepProgress(len(planned), samples_to_run, rich_bar=rich_bar)
    try:
        for run in planned:
            label = f"run {run.index}/{len(planned)} {run.point.name}"
            if records[run.point.name].reused:
                progress.print(f"{label}: finished before, skipped")
                continue
            progress.start_run(run.index, run.point.name, run.config.data.train_steps, _samples_per_step(run.config))
            record = records[run.point.name] = _execute(run, run_fn, progress.step)
            progress.end_run()
            if record.status == "failed":
                progress.print(f"{label} FAILED: {record.error}; the end of {run.dir.log_path}:\n"
                               f"{run.dir.log_tail(LOG_TAIL_LINES)}")
            _write(spec, planned, records)
    finally:
        _write(spec, planned, records)
        progress.close()
    failed = [run.point.name for run in planned if records[run.point.name].status == "failed"]
    reused = sum(record.reused for record in records.values())
    print(f"sweep: {len(planned) - len(failed)} of {len(planned)} runs finished ({reused} finished before); "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; summary in {spec.out / SUMMARY_FILE}",
          flush=True)
    return 1 if failed else 0


def _samples_per_step(config: RunConfig) -> int:
    """The samples a step generates and trains on: the unit of the sweep's ETA."""
    return config.data.rollout_batch_size * config.rollout.n_samples_per_prompt


def _without_launched_ports(config: RunConfig) -> dict:
    """The config as nested dicts, each launched engine's port (chosen free at launch) left out."""
    raw = config.model_dump(mode="json", by_alias=True)
    for engine in raw["rollout"]["engines"]:
        if engine["launch"]:
            del engine["port"]
    return raw


def _placement(out: Path, run_dir: RunDir) -> list[str]:
    """The overrides that put a run's outputs into its directory (paths quoted as YAML strings)."""
    return [f"tracking.dir={json.dumps(str(out))}", f"tracking.run_name={json.dumps(run_dir.path.name)}",
            f"tracking.jsonl_path={METRICS_FILE}", f"checkpoint.dir={json.dumps(str(run_dir.checkpoint_dir))}",
            "checkpoint.resume=false"]


def _earlier_record(run: PlannedRun) -> RunRecord:
    marker = run.dir.marker()
    if marker is None:
        return RunRecord()
    return RunRecord("finished", reused=True, exit_code=0, wall_seconds=marker["wall_seconds"])


def _execute(run: PlannedRun, run_fn: RunFunction, on_step: Callable[[int], None]) -> RunRecord:
    """Clear the run's directory, write its config, train it, and mark it finished if it is."""
    for _ in range(PORT_ATTEMPTS):
        run.dir.clear()
        config = with_free_engine_ports(run.config)
        run.dir.config_path.write_text(dump_config(config))
        start = time.monotonic()
        exit_code = run_fn(run.dir, config.parallel.world_size, on_step)
        wall = time.monotonic() - start
        if exit_code == 0 or not lost_port_race(run.dir):
            break
    steps, wanted = run.dir.steps_logged(), config.data.train_steps
    if exit_code != 0:
        return RunRecord("failed", exit_code=exit_code, wall_seconds=wall, error=f"exit code {exit_code}")
    if steps != wanted:
        return RunRecord("failed", exit_code=exit_code, wall_seconds=wall,
                         error=f"exit code 0 but {run.dir.metrics_path} has {steps} rows, not data.train_steps = "
                               f"{wanted}")
    run.dir.mark_finished(wall, steps)
    return RunRecord("finished", exit_code=0, wall_seconds=wall)


def _write(spec: SweepSpec, planned: list[PlannedRun], records: dict[str, RunRecord]) -> None:
    runs = []
    for run in planned:
        record = records[run.point.name]
        started = record.status != "pending"
        rewards = reward_summary(run.dir.rewards() if started else [])
        runs.append({"name": run.point.name, "dir": str(run.dir.path), "grid_point": dict(run.point.point),
                     "seed": run.point.seed, "train_steps": run.config.data.train_steps, "status": record.status,
                     "reused": record.reused, "exit_code": record.exit_code, "wall_seconds": record.wall_seconds,
                     "steps": run.dir.steps_logged() if started else 0, "reward_final": rewards["final"],
                     "reward_last_10pct": rewards["last_10pct"], "error": record.error})
    write_summary(spec.out, {
        "command": spec.command, "config": str(spec.config), "overrides": list(spec.overrides),
        "grid": {axis.key: list(axis.values) for axis in spec.axes},
        "variants": {axis.key: {value: list(axis.overrides(value)) for value in axis.values}
                     for axis in spec.axes if axis.variants is not None},
        "seeds": list(range(spec.seeds)), "runs": runs})

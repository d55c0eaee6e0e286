"""`megatron-rl sweep`: a grid of short RL runs, one after the other, resumable, with a progress bar.

    grid.py      --grid KEY=V1,V2 options x seeds -> named runs and their overrides
    runner.py    plan (every run's config validated first), run, skip finished runs, report failures
    launch.py    one run: torchrun over its config file, free engine ports, output to its log
    run_dir.py   a run's directory: config, log, metrics, the finished marker, reward summaries
    progress.py  run i/N, the current run's step and an ETA on the console
    summary.py   DIR/sweep.json
"""

from megatron_rl.sweep.grid import GridAxis, GridError, RunPoint, expand_grid, parse_grid_option, run_name
from megatron_rl.sweep.runner import SweepError, SweepSpec, plan_sweep, run_sweep
from megatron_rl.sweep.summary import read_summary

__all__ = ["GridAxis", "GridError", "RunPoint", "SweepError", "SweepSpec", "expand_grid", "parse_grid_option",
           "plan_sweep", "read_summary", "run_name", "run_sweep"]

"""Reports on sweeps (megatron_rl/sweep/): reward curves and final rewards per grid point, as PNGs and markdown.

    aggregate.py  the finished runs of a sweep grouped by grid point: reward per step and final reward,
                  mean / min / max over seeds
    plots.py      the two PNGs (matplotlib)
    report.py     DIR/report.md embedding them, with the command, seeds and settings

Studies (named grids such as staleness or KPO ratio smoothing) are defined on top of these.
"""

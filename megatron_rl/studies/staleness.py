"""The staleness study (VESPO's Table 2 protocol at toy scale): loss x N mini-batch updates per rollout batch.

The mini-batch is fixed at MINI_BATCH_PROMPTS prompts (x 8 samples) and a rollout batch holds N of them
(data.rollout_batch_size = N x MINI_BATCH_PROMPTS, data.num_mini_batches = N), so mini-batch k of a step is
k - 1 updates stale. Every run makes the same OPTIMIZER_STEPS optimizer steps on the same number of samples
(data.train_steps = OPTIMIZER_STEPS / N), as VESPO compares a fixed number of gradient steps; curves are
drawn over x = (step - 1) N, the optimizer steps made before the rollout of the step.
"""

from pathlib import Path

from megatron_rl.studies.aggregate import aggregate, metric_curves
from megatron_rl.studies.plots import Series, plot_curves, plot_grid
from megatron_rl.studies.report import format_spread
from megatron_rl.studies.study import FigureFile, Study
from megatron_rl.studies.study_report import reward_table
from megatron_rl.sweep.grid import GridAxis
from megatron_rl.sweep.run_dir import REWARD_METRIC

MINI_BATCH_PROMPTS = 32  # the quickstart's rollout batch: its budget is known to learn the task
OPTIMIZER_STEPS = 144  # the quickstart's 140, rounded to a multiple of every N
STALENESS = (1, 4, 8, 16)
LOSSES = {
    "grpo": ("algorithm.loss=ppo", "algorithm.ppo.eps_high=0.28"),  # VESPO's GRPO baseline: clip (0.2, 0.28)
    "gspo": ("algorithm.loss=gspo",),
    "sapo": ("algorithm.loss=sapo",),
    "kpo": ("algorithm.loss=kpo",),
    "vespo": ("algorithm.loss=vespo",),
}


def _staleness_overrides(n: int) -> tuple[str, ...]:
    return (f"data.num_mini_batches={n}", f"data.rollout_batch_size={MINI_BATCH_PROMPTS * n}",
            f"data.train_steps={OPTIMIZER_STEPS // n}")


def figures(summary: dict, out: Path) -> list[FigureFile]:
    curves = metric_curves(summary, REWARD_METRIC)
    panels = []
    for loss in summary["grid"]["loss"]:
        series = [Series(f"N={c.grid_point['N']}", [(step - 1) * int(c.grid_point["N"]) for step in c.steps],
                         c.values) for c in curves if c.grid_point["loss"] == loss]
        panels.append((loss, series))
    plot_curves(panels, out / "reward_curves.png", "staleness", "optimizer steps before the rollout",
                "reward (rollout/reward_mean)")
    cells = {(p.grid_point["loss"], p.grid_point["N"]): p.last_10pct for p in aggregate(summary)}
    plot_grid(summary["grid"]["loss"], summary["grid"]["N"], cells, out / "final_reward_grid.png",
              "reward over the last 10 % of steps", "loss", "N (mini-batch updates per rollout batch)")
    return [FigureFile("reward_curves.png", "Reward per loss (one panel each) and N, over the optimizer steps made "
                       "before each rollout; mean over seeds with a min-max band."),
            FigureFile("final_reward_grid.png", "Reward over the last 10 % of each run's steps: mean [min, max] "
                       "over seeds, per loss and N.")]


def findings(summary: dict) -> list[str]:
    points = {(p.grid_point["loss"], p.grid_point["N"]): p for p in aggregate(summary)}
    ns = summary["grid"]["N"]
    lines = [*reward_table(summary), "Reward over the last 10 % of steps, mean [min, max] over seeds:", "",
             "| loss | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    lines += [f"| {loss} | " + " | ".join(format_spread(points[(loss, n)].last_10pct) if (loss, n) in points else "-"
                                        for n in ns) + " |" for loss in summary["grid"]["loss"]]
    first, last = ns[0], ns[-1]
    lines += ["", f"Change from N={first} to N={last} (difference of the seed means; 'ranges overlap' when the "
              "min-max ranges over seeds of the two overlap, so the seeds do not separate them):", ""]
    for loss in summary["grid"]["loss"]:
        low, high = points.get((loss, first)), points.get((loss, last))
        if low is None or high is None or low.last_10pct is None or high.last_10pct is None:
            continue
        a, b = low.last_10pct, high.last_10pct
        overlap = "ranges overlap" if a.low <= b.high and b.low <= a.high else "ranges do not overlap"
        lines.append(f"- {loss}: {a.mean:.3f} -> {b.mean:.3f} ({b.mean - a.mean:+.3f}; {overlap})")
    return lines


STUDY = Study(
    name="staleness",
    title="Staleness: GRPO, GSPO, SAPO, KPO and VESPO at N = 1, 4, 8, 16 mini-batch updates per rollout batch",
    axes=(GridAxis("loss", tuple(LOSSES), tuple(LOSSES.values())),
          GridAxis("N", tuple(map(str, STALENESS)), tuple(_staleness_overrides(n) for n in STALENESS))),
    overrides=(),
    steps=None,
    smoke_values={"loss": ("vespo",), "N": ("1", "4")},
    claim="VESPO (arXiv 2602.10693, Table 2; Qwen3-30B-A3B-Base, average of AIME25 / AIME24 / AMC23 / MATH500) "
          "trains with gbs = N x 256 prompts, N = 4 ... 64 mini-batch updates per rollout batch: VESPO 70.0 / 70.0 "
          "/ 67.3 / 64.5 / 61.8 for N = 4 / 8 / 16 / 32 / 64; GRPO 54.0 -> 48.6, GSPO 59.9 -> 47.6, and SAPO "
          "65.2 -> 51.7 at N = 8 and 16.5 at N = 64 (ALGORITHMS.md 3.4). Its claim: VESPO's curves barely move with "
          "N, GRPO degrades, SAPO collapses at N >= 8 (ALGORITHMS.md 6). KPO (arXiv 2602.10609) was not in that "
          "table; it is run here under the same protocol.",
    design=f"The quickstart's toy task (a random 2-layer Qwen3 learns to repeat a number; reward 1 for the right "
           f"answer), 2 gloo learner ranks and one `megatron-rl serve` engine in float32 without logit noise, so "
           f"staleness is the only off-policyness. As in VESPO's protocol the mini-batch is fixed "
           f"({MINI_BATCH_PROMPTS} prompts x 8 samples) and a rollout batch holds N of them; every run makes "
           f"{OPTIMIZER_STEPS} optimizer steps on {OPTIMIZER_STEPS * MINI_BATCH_PROMPTS} prompts "
           f"(data.train_steps = {OPTIMIZER_STEPS} / N), so the runs differ in staleness only, not in data or "
           f"updates. The mini-batch and the number of updates are the quickstart's (kpo, N = 1), whose "
           f"reward rises from <= 0.2 to >= 0.7 over them: with 8-prompt mini-batches and 128 updates (the first "
           f"design) the reward stayed near 0.1 (the smoothing study's runs), and every loss would have been "
           f"compared on noise. "
           f"GRPO is `ppo` with GRPO advantages and VESPO's clip (0.2, 0.28); the other losses use the "
           f"papers' defaults (GSPO 3e-4 / 4e-4, SAPO tau 1.0 / 1.05, KPO q 1e-6, VESPO (2, 3) / (3, 2)). "
           f"Evaluation is the training reward (no held-out benchmark).",
    estimate="60 runs of 144 updates of 32 prompts x 8 samples; measured 97-201 s per run (136 s mean) once the "
             "fleet sent a prompt's 8 samples in one request: about 2.3 h; resumable, so it can run in parts.",
    figures=figures,
    findings=findings,
)

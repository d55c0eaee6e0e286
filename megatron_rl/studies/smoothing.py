"""The smoothing study (KPO): the filter's process noise q (algorithm.kpo.q) over Q_VALUES.

KPO filters z_t = log pi_theta - log pi_old, the learner's ratio to its own policy before the step; the engine's
mismatch does not enter it. With one mini-batch per rollout batch z = 0 exactly and the filter has nothing to
do, so the runs take the KPO paper's 4 mini-batches (mini-batches 2-4 of a step are 1-3 updates stale).
Per q: the raw and filtered sign-switch frequency (train/kpo/z_switch_freq, x_hat_switch_freq) and variance
(train/kpo/z_var, x_hat_var) over training, and the reward.
"""

from pathlib import Path

from matplotlib import colormaps

from megatron_rl.studies.aggregate import aggregate, metric_curves, metric_means
from megatron_rl.studies.plots import Series, plot_curves
from megatron_rl.studies.study import FigureFile, Study, reward_figures
from megatron_rl.studies.study_report import point_table, reward_table
from megatron_rl.sweep.grid import GridAxis

Q_KEY = "algorithm.kpo.q"
Q_VALUES = ("1e-6", "1e-4", "1e-2")
MINI_BATCHES = 4
ROLLOUT_PROMPTS = 128  # 4 mini-batches of the quickstart's 32 prompts
STEPS = 36  # 144 updates: the quickstart's budget, over which its reward rises from <= 0.2 to >= 0.7
RAW_AND_FILTERED = {"switch": ("train/kpo/z_switch_freq", "train/kpo/x_hat_switch_freq"),
                    "variance": ("train/kpo/z_var", "train/kpo/x_hat_var")}


def _raw_and_filtered(summary: dict, kind: str) -> list[Series]:
    raw, filtered = (metric_curves(summary, metric) for metric in RAW_AND_FILTERED[kind])
    colors = colormaps["tab10"].colors
    series = []
    for index, (z, x_hat) in enumerate(zip(raw, filtered, strict=True)):
        q, color = z.grid_point[Q_KEY], colors[index % len(colors)]
        series += [Series(f"q={q} filtered x_hat", x_hat.steps, x_hat.values, color=color),
                   Series(f"q={q} raw z", z.steps, z.values, dashed=True, color=color)]
    return series


def figures(summary: dict, out: Path) -> list[FigureFile]:
    plot_curves([("", _raw_and_filtered(summary, "switch"))], out / "switch_frequency.png", "KPO sign switches",
                "step", "fraction of adjacent token pairs that flip sign")
    plot_curves([("", _raw_and_filtered(summary, "variance"))], out / "variance.png", "KPO log-ratio variance",
                "step", "variance over the step's response tokens", log_y=True)
    return [FigureFile("switch_frequency.png", "Sign-switch frequency of the raw log-ratio z (dashed) and of the "
                       "filtered x_hat (solid) per step, per q."),
            FigureFile("variance.png", "Variance of z (dashed) and x_hat (solid) over the response tokens of each "
                       "step (log scale), per q."),
            *reward_figures(summary, out, "q")]


def findings(summary: dict) -> list[str]:
    labels = [p.label for p in aggregate(summary)]
    columns = [(f"{header} (mean over steps)", metric_means(summary, metric).get)
               for header, metric in (("z switch", "train/kpo/z_switch_freq"),
                                      ("x_hat switch", "train/kpo/x_hat_switch_freq"),
                                      ("z variance", "train/kpo/z_var"), ("x_hat variance", "train/kpo/x_hat_var"),
                                      ("clip fraction", "train/policy/clip_frac"))]
    return [*reward_table(summary), "Per run, the mean over its steps; then mean [min, max] over seeds:", "",
            *point_table(labels, columns)]


STUDY = Study(
    name="smoothing",
    title="KPO smoothing: the filter's process noise q = 1e-6, 1e-4, 1e-2",
    axes=(GridAxis(Q_KEY, Q_VALUES),),
    overrides=("algorithm.loss=kpo", f"data.num_mini_batches={MINI_BATCHES}",
               f"data.rollout_batch_size={ROLLOUT_PROMPTS}"),
    steps=STEPS,
    smoke_values={Q_KEY: ("1e-6", "1e-2")},
    claim="KPO (arXiv 2602.10609, ALGORITHMS.md 2.5-2.6): Q = 1e-6 (clipped objective; 1e-4 reportedly for the "
          "unclipped one), R = 1; larger Q / R (weaker smoothing, 1e-2 is mentioned) degrades the reward; the "
          "token switch frequency of the ratio drops from 0.43 to 0.01 after filtering (secondary source).",
    design=f"The quickstart's toy task, loss `kpo` (clip 3e-4 / 4e-4, R = 1), {ROLLOUT_PROMPTS} prompts x 8 samples "
           f"per rollout batch split into {MINI_BATCHES} mini-batches (the KPO paper's 4), {STEPS} steps "
           f"({STEPS * MINI_BATCHES} optimizer steps of {ROLLOUT_PROMPTS // MINI_BATCHES} prompts, the quickstart's "
           "budget; the same runs as the staleness study's kpo N = 4 point). "
           "KPO filters z = log pi_theta - log pi_old, the learner's ratio to its own policy before the update: with "
           "one mini-batch z is exactly 0 and the filter has nothing to do, and an engine-side mismatch (bf16, logit "
           "noise) does not enter z at all, so staleness is what makes the ratios deviate here. The trainer "
           f"logs a step's train/* metrics from its last mini-batch, which is {MINI_BATCHES - 1} updates stale.",
    estimate="9 runs of ~65 s start-up + 4x the work of the first design's runs (88-118 s each for 32 steps of "
             "32 prompts): about 4 min per run, 35 min in all.",
    figures=figures,
    findings=findings,
)

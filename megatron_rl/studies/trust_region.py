"""The trm study: token-level IS, PPO-clip and TRM's three masks under a real train-inference mismatch.

The engine adds N(0, NOISE_STD^2) noise to its tempered logits (rollout.engines[i].logit_noise_std), so it
samples from and reports mu != pi_theta; one mini-batch per rollout batch (as in the TRM paper), so the
mismatch is the only off-policyness. Per variant: reward, TRM's acceptance rate, the log-PPL gap
(train/mismatch/log_ppl_abs_diff) and the bounds over training (`train/trm/*` for the `trm` loss,
`train/trm_mask/*` for PPO-clip, whose mask accepts everything and only measures).
"""

import json
from pathlib import Path

import yaml

from megatron_rl.config import dump_config, load_config
from megatron_rl.studies.aggregate import Curve, Spread, aggregate, metric_curves, metric_means
from megatron_rl.studies.plots import Series, plot_curves
from megatron_rl.studies.study import FigureFile, Study, reward_figures
from megatron_rl.studies.study_report import point_table, reward_table
from megatron_rl.sweep.grid import GridAxis

NOISE_STD = 0.1
STEPS = 100
ACCEPT_ALL = ".inf"  # a mask threshold every sequence passes: the mask only measures
VARIANTS = {
    "token-IS": ("algorithm.loss=trm", f"algorithm.trm.max_k2={ACCEPT_ALL}", "algorithm.trm.avg_k3=null"),
    "PPO-clip": ("algorithm.loss=ppo", "algorithm.ppo.eps_high=0.28", f"algorithm.corrections.trm.max_k2={ACCEPT_ALL}"),
    "TRM-max": ("algorithm.loss=trm", "algorithm.trm.max_k2=0.05", "algorithm.trm.avg_k3=null"),
    "TRM-avg": ("algorithm.loss=trm", "algorithm.trm.max_k2=null", "algorithm.trm.avg_k3=0.001"),
    "TRM-combined": ("algorithm.loss=trm", "algorithm.trm.max_k2=0.1", "algorithm.trm.avg_k3=0.002"),
}
BOUNDS = ("classical", "pm_kl", "mix_kl", "unified")
GAP = "train/mismatch/log_ppl_abs_diff"


def trm_curves(summary: dict, name: str) -> dict[str, Curve]:
    """TRM's metric `name` per step, per grid point label: `train/trm/<name>` (the loss's own mask), or else
    `train/trm_mask/<name>`."""
    found = {c.label: c for c in metric_curves(summary, f"train/trm_mask/{name}") if c.steps}
    return found | {c.label: c for c in metric_curves(summary, f"train/trm/{name}") if c.steps}


def trm_means(summary: dict, name: str) -> dict[str, Spread]:
    """The same choice of metric, as each seed's mean over steps, mean / min / max over seeds."""
    found = {label: v for label, v in metric_means(summary, f"train/trm_mask/{name}").items() if v is not None}
    return found | {label: v for label, v in metric_means(summary, f"train/trm/{name}").items() if v is not None}


def _series(curves: dict[str, Curve]) -> list[Series]:
    return [Series(curve.grid_point["variant"], curve.steps, curve.values) for curve in curves.values()]


def figures(summary: dict, out: Path) -> list[FigureFile]:
    plot_curves([("", _series(trm_curves(summary, "accept_rate")))], out / "acceptance.png",
                "TRM acceptance rate", "step", "accepted fraction of sequences")
    gap = {c.label: c for c in metric_curves(summary, GAP)}
    plot_curves([("", _series(gap))], out / "log_ppl_gap.png", "log-PPL gap", "step",
                "mean_i |mean_t (log pi_old - log mu)|")
    plot_curves([(bound, _series(trm_curves(summary, f"bound_{bound}"))) for bound in BOUNDS],
                out / "bounds.png", "TRM bounds", "step", "bound (rewards in [0, 1])", log_y=True, columns=2)
    return [*reward_figures(summary, out, "variant"),
            FigureFile("acceptance.png", "Fraction of sequences TRM's mask accepts per step (token-IS and PPO-clip: "
                       "a mask that accepts every sequence, so 1 by construction)."),
            FigureFile("log_ppl_gap.png", "The log-PPL gap between the learner (pi_old) and the engine (mu) per step."),
            FigureFile("bounds.png", "TRM's bounds on the accepted sequences per step, from sample estimates "
                       "(delta = their largest max_t k2, T = their longest length), log scale.")]


def findings(summary: dict) -> list[str]:
    labels = [p.label for p in aggregate(summary)]
    columns = [("acceptance", trm_means(summary, "accept_rate").get),
               ("log-PPL gap", metric_means(summary, GAP).get),
               ("mismatch k3", metric_means(summary, "train/mismatch/k3").get),
               ("bound unified", trm_means(summary, "bound_unified").get),
               ("bound mix_kl", trm_means(summary, "bound_mix_kl").get)]
    return [*reward_table(summary), "Per run, the mean over its steps; then mean [min, max] over seeds:", "",
            *point_table(labels, columns)]


def noisy_engines(config: Path, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The override that gives every engine of the base config (with `overrides`) logit noise NOISE_STD."""
    engines = yaml.safe_load(dump_config(load_config(config, list(overrides))))["rollout"]["engines"]
    return ("rollout.engines=" + json.dumps([{**engine, "logit_noise_std": NOISE_STD} for engine in engines]),)


STUDY = Study(
    name="trm",
    title=f"Trust region under mismatch: token-IS, PPO-clip, TRM-max / avg / combined at logit noise {NOISE_STD}",
    axes=(GridAxis("variant", tuple(VARIANTS), tuple(VARIANTS.values())),),
    overrides=("data.num_mini_batches=1",),
    config_overrides=noisy_engines,
    steps=STEPS,
    smoke_values={"variant": ("token-IS", "TRM-max")},
    claim="TRM (arXiv 2512.23075, ALGORITHMS.md 4.3-4.4; Qwen3-8B-Base, vLLM rollouts vs FSDP training, one "
          "mini-batch): TRM-Max (max_t k2 <= 0.05) and TRM-Avg (mean_t k3 <= 0.001) train stably, PPO-clip "
          "[0.8, 1.28] and token-IS degrade or collapse; the looser single criteria (0.1, 0.002) each fail but "
          "combined they succeed. The paper has figures only, and recommends an acceptance rate above 70 %.",
    design=f"The quickstart's toy task with one mini-batch per rollout batch (32 prompts x 8 samples), {STEPS} "
           f"steps. The mismatch: the engine adds N(0, {NOISE_STD}^2) noise to its tempered logits "
           f"(`rollout.engines[i].logit_noise_std={NOISE_STD}`, seed 0, float32), so it samples from and reports "
           "mu = softmax(logits / T + noise) while the learner computes pi; the tests measured a per-token "
           "|log pi - log mu| of 0.079 at this level. TRM-max, TRM-avg and TRM-combined are the `trm` loss "
           "(token-IS REINFORCE -M A rho_t, rho = pi_theta / mu, divided by all sequences) at the paper's thresholds; "
           "token-IS is the same loss with a mask that accepts every sequence (max_k2 = inf). PPO-clip is `ppo` "
           "with clip (0.2, 0.28) and dual-clip 3: its ratio is pi_theta / pi_old with pi_old recomputed by the "
           "learner, so with one mini-batch it neither sees nor corrects the mismatch (the paper's PPO-clip may "
           "clip pi_theta / mu instead; it does not say). An accept-everything `corrections.trm` mask on PPO-clip "
           "records the same bound metrics without changing its loss.",
    estimate="15 runs of ~65 s start-up + 100 steps of ~1.5-2.5 s (smoke run): about 1 h.",
    figures=figures,
    findings=findings,
)

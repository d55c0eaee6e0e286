"""Outcome-reward advantage estimators: one scalar reward per response, one advantage per response.

Inputs everywhere: rewards [B] float, group_ids [B] integer (responses to the same prompt share an
id; groups may differ in size and need not be contiguous). Outputs are [B], in float32 or in the
rewards' dtype if wider. Group statistics are vectorised (index_add), with no loop over samples.

A group of size 1 has no baseline, so its GRPO / Dr.GRPO / RLOO advantage is 0 (verl returns R
for such a group). std is the unbiased estimator, as torch.std.
"""

import torch

from megatron_rl.algorithms.hyperparams import AdvantageConfig


def _check(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Validate the inputs; return the rewards in the compute dtype (float32 or wider)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"rewards must be finite: row {row} is {rewards[row].item()}")
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def _group_moments(x: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per sample: x - mean_g, the group's unbiased std (0 for size 1) and the group size n; [B] each."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(x.dtype)
    centered = x - (torch.zeros_like(n).index_add_(0, inverse, x) / n)[inverse]
    var = torch.zeros_like(n).index_add_(0, inverse, centered.square()) / (n - 1).clamp_min(1)
    return centered, var.sqrt()[inverse], n[inverse]


def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
         norm_by_std: bool = True) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_g) / (std_g + eps); norm_by_std=False gives A_i = R_i - mean_g."""
    centered, std, _ = _group_moments(_check(rewards, group_ids), group_ids)
    return centered / (std + eps) if norm_by_std else centered


def drgrpo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO (= GRPO without the std): A_i = R_i - mean_g."""
    return grpo(rewards, group_ids, norm_by_std=False)


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = R_i - mean_{j != i in g} R_j = G / (G - 1) (R_i - mean_g), G the group size."""
    centered, _, n = _group_moments(_check(rewards, group_ids), group_ids)
    return centered * n / (n - 1).clamp_min(1)


def reinforce_pp(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: A_i = (R_i - mean_batch) / (std_batch + eps); group_ids only validated.

    Whitening is over responses (one value each), not over tokens as in verl's masked_whiten.
    """
    return grpo(rewards, torch.zeros_like(group_ids), eps)


def reinforce_pp_baseline(rewards: torch.Tensor, group_ids: torch.Tensor,
                          eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline: A_i = whiten_batch(R_i - mean_g), whitened as in `reinforce_pp`."""
    return reinforce_pp(drgrpo(rewards, group_ids), group_ids, eps)


def compute_advantages(config: AdvantageConfig, rewards: torch.Tensor,
                       group_ids: torch.Tensor) -> torch.Tensor:
    """[B] advantages with the estimator named by config.estimator (hyperparams.AdvantageEstimatorName)."""
    estimators = {
        "grpo": lambda: grpo(rewards, group_ids, config.eps),
        "grpo_no_std": lambda: drgrpo(rewards, group_ids),
        "drgrpo": lambda: drgrpo(rewards, group_ids),
        "rloo": lambda: rloo(rewards, group_ids),
        "reinforce_pp": lambda: reinforce_pp(rewards, group_ids, config.eps),
        "reinforce_pp_baseline": lambda: reinforce_pp_baseline(rewards, group_ids, config.eps),
    }
    if config.estimator not in estimators:
        raise ValueError(f"estimator must be one of {sorted(estimators)}, got {config.estimator!r}")
    return estimators[config.estimator]()


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] advantages, [B, T] mask (bool or 0/1) -> [B, T]: A_i on response tokens, 0 on padding."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"advantages must be [B] and response_mask [B, T], got "
                         f"{tuple(advantages.shape)} and {tuple(response_mask.shape)}")
    return advantages[:, None] * response_mask.to(advantages.dtype)

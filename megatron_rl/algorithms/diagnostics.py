"""Diagnostics of the losses: per-step metrics, exact under context parallelism and combinable over
micro-batches and data-parallel ranks (see `metrics` for the reductions).

Notation as in `policy_loss`: z_t = clamp(log pi_theta - log pi_old) (detached), x_hat_t KPO's
filtered z, m the response mask; "pairs" are the adjacent response tokens (t-1, t) of a
sequence, both with m = 1.

- policy/entropy (token): H_t = -sum_v pi_theta(v|c_t) log pi_theta(v|c_t), at the rollout
  temperature, over response tokens (the learner passes H [B, T_local] with the log-probs).
- kpo/{z,x_hat}_mean and _sq_mean (token), giving kpo/{z,x_hat}_var = E[v^2] - E[v]^2 over the
  response tokens of the step, and kpo/x_hat_abs_std = sqrt(E[x_hat^2] - E[|x_hat|]^2) (derived).
- kpo/{z,x_hat}_switch_freq (weighted by the number of pairs): the "switch frequency" of
  ALGORITHMS.md 2.6 (0.43 -> 0.01 in the paper), the fraction of pairs whose deviation flips
  sign. The deviation is that of the log ratio from 0 (of the ratio from 1), so a pair flips iff
  v_{t-1} v_t < 0; a token with v = 0 exactly (on policy) deviates neither way and flips with
  neither neighbour. Under CP the pair that straddles a chunk boundary is counted once, by the
  rank holding its later token (`SequenceOps.previous_column`).
- vespo/phi_p10, _p50, _p90 (quantile): quantiles of phi over the step's non-empty sequences.
- {trm,trm_mask}/reject_rate_len_{lo}-{hi} (weighted by the bucket's sequence count): the
  fraction of the non-empty sequences with lo <= |y| <= hi that TRM's mask rejects, in the fixed
  power-of-two buckets lo = 2^k, hi = 2^(k+1) - 1 (k = 0, 1, ...); a bucket without a sequence
  is absent. Rejection by TRM-Max grows like 1 - (1 - p)^|y| (ALGORITHMS.md 4.3), so the
  buckets are even in log |y|.
"""

import torch

from megatron_rl.algorithms.loss_inputs import LossInputs
from megatron_rl.algorithms.metrics import Metrics
from megatron_rl.algorithms.sequence_ops import WholeSequences

PHI_QUANTILES = (0.1, 0.5, 0.9)


def entropy_metrics(x: LossInputs, entropy: torch.Tensor) -> Metrics:
    """policy/entropy from the per-token entropy [B, T_local] (values on padding are ignored)."""
    if entropy.shape != x.mask.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {tuple(x.mask.shape)} (that of log_prob)")
    on_response = torch.where(x.mask.bool(), entropy.detach(), 0.0)
    return Metrics().add("token", {"policy/entropy": x.ops.mean(on_response, x.mask)})


def sign_flips(series: torch.Tensor, mask: torch.Tensor, ops: WholeSequences) -> tuple[torch.Tensor, torch.Tensor]:
    """(flips [K], pairs): over the pairs (t-1, t) of adjacent response tokens, how many have
    v_{t-1} v_t < 0 in each of the K series [K, B, T_local], and how many pairs there are.
    float64, global over the CP group (detached)."""
    stacked = torch.cat([series.detach(), mask[None].to(series.dtype)]).to(torch.float64)
    previous = ops.previous_column(stacked)
    pair = (mask != 0) & (previous[-1] != 0)
    flips = ((stacked[:-1] * previous[:-1] < 0) & pair).sum(dim=(-2, -1))
    counts = ops.total(torch.cat([flips, pair.sum()[None]]).to(torch.float64))
    return counts[:-1], counts[-1]


def kpo_metrics(x: LossInputs, x_hat: torch.Tensor) -> Metrics:
    """KPO's statistics of the raw z and the filtered x_hat [B, T_local] (moments in float64)."""
    z, filtered = x.log_ratio.detach().to(torch.float64), x_hat.detach().to(torch.float64)
    metrics = Metrics().add("token", {
        f"kpo/{name}{suffix}": x.ops.mean(fn(v), x.mask)
        for name, v in (("z", z), ("x_hat", filtered))
        for suffix, fn in (("_mean", lambda v: v), ("_abs_mean", torch.abs), ("_sq_mean", torch.square))
    })
    metrics.add("max", {"kpo/x_hat_abs_max": x.ops.max(filtered.abs(), x.mask)})
    flips, pairs = sign_flips(torch.stack([z, filtered]), x.mask, x.ops)
    return metrics.add_weighted({"kpo/z_switch_freq": (flips[0], pairs), "kpo/x_hat_switch_freq": (flips[1], pairs)})


def rejection_by_length(keep: torch.Tensor, lengths: torch.Tensor, prefix: str) -> Metrics:
    """prefix/reject_rate_len_{lo}-{hi} from keep [B] bool and the response lengths [B] (global)."""
    nonempty = lengths > 0
    bucket = torch.frexp(lengths.to(torch.float64))[1] - 1  # k with 2^k <= length < 2^(k+1)
    metrics = Metrics()
    for k in torch.unique(bucket[nonempty]).tolist():
        members = nonempty & (bucket == k)
        low = 2**k
        metrics.add_weighted({f"{prefix}/reject_rate_len_{low}-{2 * low - 1}": (
            (members & ~keep).sum().to(torch.float64), members.sum().to(torch.float64))})
    return metrics

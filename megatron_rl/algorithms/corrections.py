"""Train-inference mismatch corrections (ALGORITHMS.md 1.7), composable with every loss.

All act on the detached mismatch log-ratio log w_t = log pi_old(y_t) - log pi_roll(y_t)
(clamped by the caller), with mask [B, T]:

- TIS, token:    w_t' = min(w_t, C)                      sequence: min(prod_t w_t, C)
- MIS, token:    w_t' = w_t [w_t <= C]                   sequence: W [W <= C], W = prod_t w_t
- IcePop:        w_t' = w_t [low <= w_t <= high]
- geo_mask:      keep a sequence iff exp(mean_t log w_t) is in [low, high]

Token-level weights ([B, T]) multiply a token-level loss; sequence-level ones ([B]) any loss.
Sequence products are formed in log space, so nothing overflows.
"""

import math
from dataclasses import dataclass

import torch

from megatron_rl.algorithms.aggregation import sequence_mean
from megatron_rl.algorithms.hyperparams import BandConfig, CorrectionsConfig
from megatron_rl.algorithms.metrics import Metrics
from megatron_rl.algorithms.sequence_ops import WholeSequences


@dataclass
class Correction:
    """The combined correction of one batch (all detached)."""

    token_weights: torch.Tensor | None  # [B, T]
    seq_weights: torch.Tensor | None  # [B]
    metrics: Metrics


def truncated_weights(log_w: torch.Tensor, threshold: float, masked: bool) -> torch.Tensor:
    """min(w, C) (TIS) or w [w <= C] (MIS), elementwise on log-weights of any shape."""
    log_c = math.log(threshold)
    clipped = log_w.clamp(max=log_c).exp()
    return torch.where(log_w <= log_c, clipped, torch.zeros_like(clipped)) if masked else clipped


def _in_band(log_w: torch.Tensor, band: BandConfig) -> torch.Tensor:
    return (log_w >= math.log(band.low)) & (log_w <= math.log(band.high))


def _product(factors: list[torch.Tensor]) -> torch.Tensor | None:
    if not factors:
        return None
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out


def mismatch_correction(
    cfg: CorrectionsConfig, log_w: torch.Tensor, mask: torch.Tensor, ops: WholeSequences
) -> Correction:
    """Combine every correction enabled in cfg into one token and one sequence weight.

    log_w: [B, T] detached log(pi_old / pi_roll). mask: [B, T] float (1 on response tokens).
    Metrics are global over the batch and prefixed mismatch/.
    """
    log_w = log_w.detach()
    counts = ops.seq_sum(mask)
    seq_log_w = ops.seq_sum(log_w * mask)
    token_factors, seq_factors, metrics = [], [], Metrics()
    for name, spec, masked in (("tis", cfg.tis, False), ("mis", cfg.mis, True)):
        if spec is None:
            continue
        if spec.level == "token":
            weights = truncated_weights(log_w, spec.threshold, masked)
            token_factors.append(weights)
            metrics.add("token", {f"mismatch/{name}_weight_mean": ops.mean(weights, mask)})
        else:
            weights = truncated_weights(seq_log_w, spec.threshold, masked)
            seq_factors.append(weights)
            metrics.add("sequence", {f"mismatch/{name}_weight_mean": sequence_mean(weights, counts)})
    if cfg.icepop is not None:
        kept = _in_band(log_w, cfg.icepop)
        token_factors.append(torch.where(kept, log_w.exp(), torch.zeros_like(log_w)))
        metrics.add("token", {"mismatch/icepop_keep_frac": ops.mean(kept.to(log_w.dtype), mask)})
    if cfg.geo_mask is not None:
        keep = _in_band(seq_log_w / counts.clamp(min=1), cfg.geo_mask) | (counts == 0)
        seq_factors.append(keep.to(log_w.dtype))
        metrics.add("sequence", {"mismatch/geo_mask_keep_frac": sequence_mean(keep.to(log_w.dtype), counts)})
    return Correction(_product(token_factors), _product(seq_factors), metrics)

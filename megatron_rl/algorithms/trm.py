"""TRM: Trust Region Masking (Li et al., arXiv 2512.23075; ALGORITHMS.md section 4).

Sequence masks: keep a response iff its per-token divergence from the rollout policy stays in a
trust region, estimated from the sampled tokens only (log_ratio = log pi_theta - log pi_roll):

- max criterion (TRM-Max): max_t 0.5 log_ratio_t^2 <= max_k2 (k2, symmetric in rho <-> 1/rho);
- avg criterion (TRM-Avg): sum_t m_t k3_t / sum_t m_t <= avg_k3, k3 = rho - 1 - log rho, an
  unbiased estimate of KL(pi_roll || pi_theta) per token.

Token reductions go through `sequence_ops` (`ops`), so the masks are exact under context
parallelism. `trm_bounds` evaluates the paper's error bounds, for metrics.
"""

import math
import numbers
from collections.abc import Sequence

import torch

from megatron_rl.algorithms.kl import kl_k2, kl_k3
from megatron_rl.algorithms.sequence_ops import WHOLE_SEQUENCES


def _prepare(log_ratio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-ratio in float32 (or wider) and the bool validity mask, both [B, T]."""
    if log_ratio.dim() != 2 or mask.shape != log_ratio.shape:
        raise ValueError(f"log_ratio and mask must both be [B, T], got {tuple(log_ratio.shape)} "
                         f"and {tuple(mask.shape)}")
    dtype = torch.promote_types(log_ratio.dtype, torch.float32)
    return log_ratio.to(dtype), mask != 0


def _seq_max_k2(lr: torch.Tensor, valid: torch.Tensor, ops) -> torch.Tensor:
    """[B]: max over valid tokens of k2; 0 for a sequence with no valid token (k2 >= 0)."""
    return ops.seq_max(torch.where(valid, kl_k2(lr), -math.inf)).clamp_min(0.0)


def _seq_mean_k3(lr: torch.Tensor, valid: torch.Tensor, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] masked mean of k3 (0 for an empty sequence) and [B] number of valid tokens."""
    length = ops.seq_sum(valid.to(lr.dtype))
    return ops.seq_sum(torch.where(valid, kl_k3(lr), 0.0)) / length.clamp_min(1.0), length


@torch.no_grad()
def trm_mask(log_ratio: torch.Tensor, mask: torch.Tensor, max_k2: float | None = None,
             avg_k3: float | None = None, ops=WHOLE_SEQUENCES) -> torch.Tensor:
    """keep [B] bool: True iff the sequence passes every given criterion (detached).

    log_ratio: [B, T] log pi_theta - log pi_roll per token, already clamped by the caller.
    mask: [B, T] bool or 0/1; values at padding (mask 0) are ignored, whatever they are.
    max_k2: keep iff max_t 0.5 log_ratio_t^2 <= max_k2. avg_k3: keep iff the masked mean of
    k3 <= avg_k3. Both given: both must hold. A sequence with no valid token is kept; a NaN on a
    valid token rejects its sequence.
    """
    if max_k2 is None and avg_k3 is None:
        raise ValueError("max_k2 / avg_k3: at least one criterion must be set, got neither")
    for name, value in (("max_k2", max_k2), ("avg_k3", avg_k3)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 or None, got {value!r}")
    lr, valid = _prepare(log_ratio, mask)
    keep = torch.ones(lr.shape[0], dtype=torch.bool, device=lr.device)
    if max_k2 is not None:
        keep &= _seq_max_k2(lr, valid, ops) <= max_k2
    if avg_k3 is not None:
        keep &= _seq_mean_k3(lr, valid, ops)[0] <= avg_k3
    return keep


@torch.no_grad()
def trm_sequence_stats(log_ratio: torch.Tensor, mask: torch.Tensor,
                       ops=WHOLE_SEQUENCES) -> dict[str, torch.Tensor]:
    """Per-sequence statistics behind `trm_mask`, for metrics; same inputs.

    Returns {"max_k2": [B], "mean_k3": [B], "length": [B] (valid-token count, float)}.
    """
    lr, valid = _prepare(log_ratio, mask)
    mean_k3, length = _seq_mean_k3(lr, valid, ops)
    return {"max_k2": _seq_max_k2(lr, valid, ops), "mean_k3": mean_k3, "length": length}


def _check_range(name: str, value: float | None, low: float, high: float, low_open: bool) -> None:
    """ValueError naming `name` unless value is None or finite and in (low, high] / [low, high]."""
    if value is not None and not (math.isfinite(value) and value <= high
                                  and (low < value if low_open else low <= value)):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be finite and in {interval}, got {value!r}")


def trm_bounds(T: int, delta: float, eps: float | None = None, d_kl_seq: float | None = None,
               d_tv_seq: float | None = None,
               d_tv_tok_mean: float | Sequence[float] | torch.Tensor | None = None) -> dict[str, float]:
    """The paper's bounds on |J(pi_theta) - J(pi_roll) - L(pi_theta)|, rewards in [0, 1] (ALGORITHMS.md 4.2).

    T: response length; delta: max token KL(pi_roll || pi_theta); eps: max token TV (default,
    where a bound needs it: Pinsker's min(1, sqrt(delta / 2))); d_kl_seq: sum_t E[token KL];
    d_tv_seq: TV of the trajectory distributions; d_tv_tok_mean: D̄_t = E[token TV] at t = 1..T
    (a float, or T values). With s = min(1, sqrt(delta / 2)) and sums over t = 1..T:

    classical = 2 T (T-1) eps^2 (eps given) else T (T-1) delta
    pm_kl     = 4 s sum_t min(1, sqrt((t-1) delta / 2))       pm_tv  = same with eps for s
    mix_kl    = 4 T s min(1, sqrt(d_kl_seq / 2))              mix_tv = 4 T eps min(1, d_tv_seq)
    coupling  = 4 eps sum_t min(1, (t-1) eps)                 (eps: Pinsker if None)
    adaptive  = 4 sum_t D̄_t min(1, (T-t) eps, sqrt((T-t) delta / 2))   (eps: Pinsker if None)
    unified   = min of the bounds above that were computed.

    A bound whose inputs are missing is absent. Computed in float64, returned as Python floats.
    """
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    _check_range("delta", delta, 0.0, math.inf, low_open=True)
    _check_range("eps", eps, 0.0, 1.0, low_open=True)
    _check_range("d_kl_seq", d_kl_seq, 0.0, math.inf, low_open=False)
    _check_range("d_tv_seq", d_tv_seq, 0.0, 1.0, low_open=False)

    T = int(T)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    s = min(1.0, math.sqrt(delta / 2))
    tv = s if eps is None else eps  # min(1, eps) = eps since eps <= 1
    pm_sum = ((t - 1) * delta / 2).sqrt().clamp(max=1.0).sum()
    bounds = {
        "classical": 2 * T * (T - 1) * eps**2 if eps is not None else T * (T - 1) * delta,
        "pm_kl": 4 * s * pm_sum,
        "coupling": 4 * tv * ((t - 1) * tv).clamp(max=1.0).sum(),
    }
    if eps is not None:
        bounds["pm_tv"] = 4 * eps * pm_sum
    if d_kl_seq is not None:
        bounds["mix_kl"] = 4 * T * s * min(1.0, math.sqrt(d_kl_seq / 2))
    if eps is not None and d_tv_seq is not None:
        bounds["mix_tv"] = 4 * T * eps * min(1.0, d_tv_seq)
    if d_tv_tok_mean is not None:
        d_bar = torch.as_tensor(d_tv_tok_mean, dtype=torch.float64)
        if d_bar.shape not in ((), (T,)) or not bool(((d_bar >= 0) & (d_bar <= 1)).all()):
            raise ValueError(f"d_tv_tok_mean must be a float or {T} values, all in [0, 1], "
                             f"got shape {tuple(d_bar.shape)}")
        rest = T - t
        weight = torch.minimum(rest * tv, (rest * delta / 2).sqrt()).clamp(max=1.0)
        bounds["adaptive"] = 4 * (d_bar * weight).sum()
    out = {name: float(value) for name, value in bounds.items()}
    out["unified"] = min(out.values())
    return out

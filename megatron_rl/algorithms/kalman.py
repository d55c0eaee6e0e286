"""KPO's causal Kalman filter over per-token log importance ratios (ALGORITHMS.md 2.2-2.8).

State space (scalar, per sequence): x_t = x_{t-1} + w_t, w ~ N(0, Q); z_t = x_t + v_t,
v ~ N(0, R); x_0 = 0, P_0 = 0. The gain K_t depends only on t and q = Q / R:
    k_t = (k_{t-1} + q) / (k_{t-1} + q + 1),   k_0 = P_0 / R,   K_t = k_t,
and the filtered estimate is the linear recurrence
    x_hat_t = (1 - K_t) x_hat_{t-1} + K_t z_t,
computed as an associative scan (`scan.affine_scan`), exact across context-parallel shards
through `SequenceOps.affine_scan`.

Positions: t is the 1-based position in the response (`SequenceOps.positions`: the column,
shifted by the layout's response_start; responses are padded on the right). Masked tokens
observe z_t = 0 and x_hat is 0 there, as in the authors' release; for right padding this
leaves every valid token's estimate untouched, and before the response the state stays 0.
"""

import functools
import math

import torch

from megatron_rl.algorithms.sequence_ops import WHOLE_SEQUENCES, WholeSequences


@functools.lru_cache(maxsize=64)
def _exact_gains(length: int, q: float, p0: float) -> torch.Tensor:
    gains = []
    k = p0
    for _ in range(length):
        k = (k + q) / (k + q + 1.0)
        gains.append(k)
    return torch.tensor(gains, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _released_gains(length: int, q: float, p0: float) -> torch.Tensor:
    """The authors' closed form, evaluated in float32 as released (ALGORITHMS.md 2.7).

    With s = 1 + q/2 and eta = arccosh(s), U_n = sinh((n+1) eta) / sinh(eta) (Chebyshev U),
    M^t = U_{t-1} M - U_{t-2} I for M = [[1, q], [1, 1+q]], hence
    K_t = ((U_{t-1} - U_{t-2}) p0 + q U_{t-1}) / (U_{t-1} p0 + (1+q) U_{t-1} - U_{t-2}),
    clamped to [1e-6, 1 - 1e-6]. In float32 s is resolved to a few ulps only, so K is ~2.4 %
    too large at q = 1e-6, and sinh overflows (NaN gains) once t sqrt(q) exceeds ~89.
    """
    f32 = torch.float32
    q32 = torch.tensor(q, dtype=f32)
    s = 1.0 + 0.5 * q32
    eta = torch.log(s + torch.sqrt(torch.clamp(s * s - 1.0, min=0.0)))
    n = torch.arange(length, dtype=f32)
    u = torch.sinh((n + 1.0) * eta) / torch.clamp(torch.sinh(eta), min=1e-20)
    if q < 1e-12:
        u = n + 1.0
    u_prev = torch.cat([torch.zeros(1, dtype=f32), u[:-1]])
    gains = ((u - u_prev) * p0 + u * q32) / (u * p0 + u * (q32 + 1.0) - u_prev)
    return torch.clamp(gains, 1e-6, 1.0 - 1e-6).to(torch.float64)


def kalman_gains(T: int, q: float, p0: float = 0.0, released_gains: bool = False) -> torch.Tensor:
    """Gains K_1..K_T as a float64 tensor [T], for q = Q / R and p0 = P_0 / R.

    The exact recursion by default (float64, cached per (T, q, p0)); released_gains=True gives
    the authors' float32 closed-form table with its known errors, for comparison only.
    Steady state: K_inf = (-q + sqrt(q^2 + 4q)) / 2 ~ sqrt(q); time constant 1 / sqrt(q) tokens.
    """
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if not (q > 0 and math.isfinite(q)):
        raise ValueError(f"q must be a finite number > 0, got {q!r}")
    if not p0 >= 0:
        raise ValueError(f"p0 must be >= 0, got {p0!r}")
    table = _released_gains if released_gains else _exact_gains
    return table(int(T), float(q), float(p0))


def kalman_filter(
    z: torch.Tensor,
    mask: torch.Tensor,
    q: float,
    r: float = 1.0,
    released_gains: bool = False,
    ops: WholeSequences = WHOLE_SEQUENCES,
) -> torch.Tensor:
    """Filtered log-ratios x_hat [B, T_local] from observations z [B, T_local] (detached).

    q is the process noise Q and r the observation noise R. z is computed in its own dtype
    (float32 is exact to ~1e-7 with the scan); the gains are cast to it. Under context
    parallelism pass the CP group's ops: the local columns are mapped to their global response
    positions and the scan carries state across ranks. No gradient flows through the filter.
    """
    if z.shape != mask.shape or z.dim() != 2:
        raise ValueError(f"z and mask must both be [B, T], got {tuple(z.shape)} and {tuple(mask.shape)}")
    if not r > 0:
        raise ValueError(f"r must be > 0, got {r!r}")
    valid, zero = mask.bool(), z.new_zeros(())
    t_local = z.shape[-1]
    table = kalman_gains(max(ops.response_length(t_local), 1), q / r, 0.0, released_gains)
    gains = table.to(device=z.device, dtype=z.dtype)[ops.positions(t_local, z.device).clamp(min=1) - 1]
    observed_gain = torch.where(valid, z.detach(), zero).mul_(gains)  # K_t z_t, 0 on padding
    return torch.where(valid, ops.affine_scan(1.0 - gains, observed_gain), zero)

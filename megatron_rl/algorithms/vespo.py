"""VESPO's closed-form kernel on the sequence-level importance weight (ALGORITHMS.md 3.1-3.2).

phi(W) = W^c1 exp(c2 (1 - W)), evaluated in log space as log phi = c1 log W + c2 (1 - W),
with (c1, c2) = pos for A >= 0 and neg for A < 0. phi(1) = 1; its maximum is
(c1/c2)^c1 exp(c2 - c1) at W = c1/c2; K = sup_w phi(w)/w is finite iff c1 >= 1.
W is the true sequence ratio prod_t rho_t (log W = sum_t log rho_t, no 1/T), clamped to
|log W| <= 20 as released.
"""

import math

import torch

LOG_W_CLAMP = 20.0
_LOG_W_FLOOR = math.log(1e-8)  # the release takes log(max(W, 1e-8))


def vespo_phi(
    log_w: torch.Tensor,
    adv_seq: torch.Tensor,
    pos: tuple[float, float] = (2.0, 3.0),
    neg: tuple[float, float] = (3.0, 2.0),
) -> torch.Tensor:
    """phi [B] (detached) from sequence log-weights log_w [B] and sequence advantages [B].

    Non-finite phi (only reachable through non-finite inputs) maps to 0, as released.
    """
    log_w = log_w.detach().clamp(-LOG_W_CLAMP, LOG_W_CLAMP)
    positive = adv_seq.detach() >= 0
    c1 = torch.where(positive, pos[0], neg[0]).to(log_w.dtype)
    c2 = torch.where(positive, pos[1], neg[1]).to(log_w.dtype)
    log_phi = c1 * log_w.clamp(min=_LOG_W_FLOOR) + c2 * (1.0 - log_w.exp())
    return torch.nan_to_num(log_phi.exp(), nan=0.0, posinf=0.0, neginf=0.0)

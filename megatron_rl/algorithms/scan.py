"""Associative scan of the first-order linear recurrence x_t = a_t x_{t-1} + b_t.

Each step is the affine map f_t(x) = a_t x + b_t. Composing "p then q" gives
(a_p, b_p) . (a_q, b_q) = (a_q a_p, a_q b_p + b_q): associative, identity (1, 0). An inclusive
scan therefore yields x_t = B_{1..t} + A_{1..t} x_0 for every t in log2(T) vectorised steps
(Hillis-Steele doubling), instead of T sequential steps. With a_t in [0, 1] the running
products only shrink toward 0 (forgetting the distant past), so the scan is stable in float32.
"""

import torch


def affine_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along the last axis, starting from x_0 = 0.

    Args:
        a: [T] (shared by every row) or [B, T] multipliers.
        b: [B, T] offsets.
    Returns:
        (prod_a, x): prod_a[..., t] = a_1 ... a_t (shape of a) and x[..., t] = x_t ([B, T]).
    """
    prod_a, x = a.clone(), b.clone()
    length = b.shape[-1]
    shift = 1
    while shift < length:
        # Segment t covers (t - 2 shift, t]: absorb the segment that ends at t - shift.
        x_next = x.clone()
        x_next[..., shift:].addcmul_(prod_a[..., shift:], x[..., :-shift])
        prod_next = prod_a.clone()
        prod_next[..., shift:].mul_(prod_a[..., :-shift])
        prod_a, x = prod_next, x_next
        shift *= 2
    return prod_a, x

"""Associative scan of the first-order linear recurrence x_t = a_t x_{t-1} + b_t.

Each step is the affine map f_t(x) = a_t x + b_t. Composing "p then q" gives
(a_p, b_p) . (a_q, b_q) = (a_q a_p, a_q b_p + b_q): associative, identity (1, 0). An inclusive
scan therefore yields x_t = B_{1..t} + A_{1..t} x_0 for every t in log2(T) vectorised steps
(Hillis-Steele doubling) instead of T sequential ones. Long sequences are scanned in blocks:
each block from x = 0, then the blocks' carries, then one correction pass, which touches the
[B, T] data ~log2(block) + 1 times instead of ~log2(T). With a_t in [0, 1] the running
products only shrink toward 0 (forgetting the distant past), so the scan is stable in float32.

When every row shares a (KPO's gains) and no block's product of a falls below
MIN_BLOCK_PRODUCT, a block is scanned in closed form instead: with P_t = a_1 ... a_t inside the
block, x_t = P_t sum_{s<=t} b_s / P_s (one cumprod of the shared [T] a, one cumsum of [B, T]),
which divides by at most 1 / MIN_BLOCK_PRODUCT and so loses at most a few bits. Across blocks
the carries are always combined by doubling, so a product that vanishes over the whole sequence
is harmless. (The release's one-level cumsum divides by products of the whole sequence, which
underflow: ALGORITHMS.md 2.7.)
"""

import torch
import torch.nn.functional as F

BLOCK = 256
MIN_BLOCK_PRODUCT = 0.05


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prod, x = a.clone(), b.clone()
    prod_next, x_next = torch.empty_like(prod), torch.empty_like(x)
    length, shift = b.shape[-1], 1
    while shift < length:
        # Segment t covers (t - 2 shift, t]: absorb the segment that ends at t - shift.
        x_next[..., :shift] = x[..., :shift]
        torch.addcmul(x[..., shift:], prod[..., shift:], x[..., :-shift], out=x_next[..., shift:])
        prod_next[..., :shift] = prod[..., :shift]
        torch.mul(prod[..., shift:], prod[..., :-shift], out=prod_next[..., shift:])
        x, x_next, prod, prod_next = x_next, x, prod_next, prod
        shift *= 2
    return prod, x


def _scan_blocks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan each block (last axis) from x = 0: closed form for a shared, well-conditioned a."""
    if a.dim() == 2:  # [blocks, block]: shared by every row
        prod = torch.cumprod(a, dim=-1)
        if prod[:, -1].min() >= MIN_BLOCK_PRODUCT:
            return prod, torch.cumsum(b / prod, dim=-1).mul_(prod)
    return _doubling_scan(a, b)


def affine_scan(a: torch.Tensor, b: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along the last axis, starting from x_0 = 0.

    Args:
        a: [T] (shared by every row) or [B, T] multipliers.
        b: [B, T] offsets.
    Returns:
        (prod_a, x): prod_a[..., t] = a_1 ... a_t (shape of a) and x[..., t] = x_t ([B, T]).
    """
    length = b.shape[-1]
    if length <= block:
        return _doubling_scan(a, b)
    blocks = -(-length // block)
    pad = blocks * block - length  # identity steps (a = 1, b = 0) after the end change nothing
    if pad:
        a, b = F.pad(a, (0, pad), value=1.0), F.pad(b, (0, pad))
    a_blocks, b_blocks = a.unflatten(-1, (blocks, block)), b.unflatten(-1, (blocks, block))
    prod_in, x_in = _scan_blocks(a_blocks, b_blocks)
    prod_carry, x_carry = _doubling_scan(prod_in[..., -1], x_in[..., -1])
    x_entering = F.pad(x_carry[..., :-1], (1, 0))
    prod_entering = F.pad(prod_carry[..., :-1], (1, 0), value=1.0)
    x = x_in.addcmul_(prod_in, x_entering[..., None]).flatten(-2)[..., :length]
    prod = (prod_in * prod_entering[..., None]).flatten(-2)[..., :length]
    return prod, x

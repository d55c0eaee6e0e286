"""KPO filter: gain table, associative scan vs the per-token loop, masking, limits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms.kalman import kalman_filter, kalman_gains
from megatron_rl.algorithms.scan import affine_scan


def kalman_loop(z: torch.Tensor, mask: torch.Tensor, q: float, r: float = 1.0) -> torch.Tensor:
    """The reference: the scalar Kalman filter, one token at a time (ALGORITHMS.md 2.3)."""
    batch, length = z.shape
    x_hat = torch.zeros(batch, dtype=torch.float64)
    p = 0.0
    out = torch.zeros(batch, length, dtype=torch.float64)
    valid = mask.bool()
    for t in range(length):
        p_prior = p + q
        gain = p_prior / (p_prior + r)
        observed = torch.where(valid[:, t], z[:, t].double(), torch.zeros(batch, dtype=torch.float64))
        x_hat = (1 - gain) * x_hat + gain * observed
        p = (1 - gain) * p_prior
        out[:, t] = torch.where(valid[:, t], x_hat, torch.zeros_like(x_hat))
    return out


@pytest.mark.parametrize("q", [1e-6, 1e-4, 1e-2])
@pytest.mark.parametrize("length", [1, 7, 4096, 32768])
def test_scan_equals_loop_float64(q, length):
    gen = torch.Generator().manual_seed(length)
    z = torch.randn(2, length, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.ones(2, length)
    mask[1, length // 2:] = 0  # right padding on the second row
    expected = kalman_loop(z, mask, q)
    assert torch.allclose(kalman_filter(z, mask, q), expected, atol=1e-9, rtol=0)


def test_float32_scan_is_close_to_float64_loop():
    z = torch.randn(3, 8192, generator=torch.Generator().manual_seed(0)) * 0.05
    mask = torch.ones(3, 8192)
    for q in (1e-6, 1e-4, 1e-2):
        err = (kalman_filter(z, mask, q).double() - kalman_loop(z, mask, q)).abs().max()
        assert err < 1e-6, (q, err)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    length=st.integers(1, 200),
    log10_q=st.floats(-7, 1),
    r=st.floats(0.1, 10),
)
def test_scan_equals_loop_random(seed, length, log10_q, r):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, length, generator=gen) > 0.2
    q = 10.0**log10_q
    assert torch.allclose(kalman_filter(z, mask, q, r), kalman_loop(z, mask, q, r), atol=1e-9, rtol=0)


def test_gain_table_matches_closed_forms():
    q = 1e-6
    gains = kalman_gains(4096, q)
    assert gains.dtype == torch.float64
    assert gains[0].item() == pytest.approx(q / (1 + q), rel=1e-12)
    # ALGORITHMS.md 2.3: K_100 = 9.97e-5, K_1000 = 7.6e-4, K_4096 = 9.99e-4 at q = 1e-6
    assert gains[99].item() == pytest.approx(9.97e-5, rel=1e-3)
    assert gains[999].item() == pytest.approx(7.6e-4, rel=2e-3)
    assert gains[4095].item() == pytest.approx(9.989e-4, rel=1e-4)
    steady = (-q + math.sqrt(q * q + 4 * q)) / 2
    assert kalman_gains(200_000, q)[-1].item() == pytest.approx(steady, rel=1e-9)
    # warm-up: K_t ~ sqrt(q) tanh(sqrt(q) t), relative error ~ sqrt(q)/2
    t = torch.arange(1, 4097, dtype=torch.float64)
    approx = math.sqrt(q) * torch.tanh(math.sqrt(q) * t)
    assert ((gains[9:] - approx[9:]) / approx[9:]).abs().max() < 1e-3


def test_released_gains_reproduce_the_release_errors():
    exact = kalman_gains(4096, 1e-6)
    released = kalman_gains(4096, 1e-6, released_gains=True)
    # ALGORITHMS.md 2.7: the release's K_4096 is 1.0229e-3, +2.4 % over the exact 9.989e-4
    assert released[4095].item() == pytest.approx(1.0229e-3, rel=1e-3)
    assert released[4095].item() / exact[4095].item() - 1 == pytest.approx(0.024, abs=1e-3)
    # sinh overflows in float32 once t sqrt(q) > ~89: NaN gains at q = 1e-4 beyond ~8.9k tokens
    overflow = kalman_gains(10_000, 1e-4, released_gains=True)
    assert not overflow[:8000].isnan().any() and overflow[9500:].isnan().all()
    assert not kalman_gains(10_000, 1e-4).isnan().any()


def test_released_gains_flow_through_the_filter():
    z = torch.full((1, 4096), 0.1, dtype=torch.float64)
    mask = torch.ones(1, 4096)
    exact = kalman_filter(z, mask, 1e-6)
    released = kalman_filter(z, mask, 1e-6, released_gains=True)
    assert not torch.allclose(exact, released, rtol=1e-3)
    expected = kalman_gains(4096, 1e-6, released_gains=True)
    x = 0.0
    for gain in expected.tolist():
        x = (1 - gain) * x + gain * 0.1
    assert released[0, -1].item() == pytest.approx(x, rel=1e-9)


def test_very_large_q_returns_the_raw_log_ratios():
    z = torch.randn(4, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(4, 300)
    assert torch.allclose(kalman_filter(z, mask, 1e12), z, atol=1e-9, rtol=0)


def test_on_policy_observations_filter_to_zero():
    z = torch.zeros(2, 64)
    assert torch.equal(kalman_filter(z, torch.ones(2, 64), 1e-4), torch.zeros(2, 64))


def test_padding_is_ignored_even_when_nan():
    z = torch.randn(2, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.ones(2, 50)
    mask[:, 30:] = 0
    clean = kalman_filter(z, mask, 1e-3)
    z[:, 30:] = float("nan")
    dirty = kalman_filter(z, mask, 1e-3)
    assert torch.equal(clean, dirty)
    assert torch.equal(dirty[:, 30:], torch.zeros(2, 20, dtype=torch.float64))
    assert torch.equal(clean[:, :30], kalman_filter(z[:, :30], mask[:, :30], 1e-3))


def test_filter_is_causal():
    z = torch.randn(1, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    changed = z.clone()
    changed[0, 60:] += 5.0
    a, b = kalman_filter(z, torch.ones(1, 100), 1e-2), kalman_filter(changed, torch.ones(1, 100), 1e-2)
    assert torch.equal(a[:, :60], b[:, :60]) and not torch.allclose(a[:, 60:], b[:, 60:])


def test_affine_scan_with_per_row_multipliers():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(3, 37, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 37, generator=gen, dtype=torch.float64)
    prod, x = affine_scan(a, b)
    state = torch.zeros(3, dtype=torch.float64)
    for t in range(37):
        state = a[:, t] * state + b[:, t]
        assert torch.allclose(x[:, t], state, atol=1e-12)
    assert torch.allclose(prod, torch.cumprod(a, dim=-1), atol=1e-15)


@pytest.mark.parametrize("kwargs, name", [
    (dict(T=0, q=1e-6), "T"),
    (dict(T=10, q=0.0), "q"),
    (dict(T=10, q=float("nan")), "q"),
    (dict(T=10, q=1e-6, p0=-1.0), "p0"),
])
def test_bad_gain_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        kalman_gains(**kwargs)


def test_filter_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="z and mask must both be"):
        kalman_filter(torch.zeros(2, 3), torch.ones(2, 4), 1e-4)


@pytest.mark.parametrize("length", [255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("shared", [True, False])
def test_blocked_scan_equals_single_level_doubling(length, shared):
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(length if shared else (2, length), generator=gen, dtype=torch.float64) * 0.2 + 0.8
    b = torch.randn(2, length, generator=gen, dtype=torch.float64)
    prod, x = affine_scan(a, b)
    prod_ref, x_ref = affine_scan(a, b, block=length)
    assert prod.shape == a.shape and x.shape == b.shape
    assert torch.allclose(x, x_ref, atol=1e-12) and torch.allclose(prod, prod_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("a_low", [0.9999, 0.995, 0.5])  # closed-form blocks for the first two, doubling for 0.5
def test_shared_multipliers_take_either_block_path_exactly(a_low):
    gen = torch.Generator().manual_seed(5)
    a = a_low + (1 - a_low) * torch.rand(3000, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3000, generator=gen, dtype=torch.float64)
    prod, x = affine_scan(a, b)
    state, states = torch.zeros(4, dtype=torch.float64), []
    for t in range(3000):
        state = a[t] * state + b[:, t]
        states.append(state)
    assert torch.allclose(x, torch.stack(states, dim=1), atol=1e-10, rtol=0)
    assert torch.allclose(prod, torch.cumprod(a, 0), rtol=1e-12, atol=1e-300)  # both underflow toward 0

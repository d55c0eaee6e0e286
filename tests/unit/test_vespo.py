"""VESPO kernel: phi(1) = 1, closed-form maximum and variance constant, clamps, non-finite input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms.vespo import vespo_phi

POS, NEG = (2.0, 3.0), (3.0, 2.0)


def phi_of(w: float, c1: float, c2: float) -> float:
    return w**c1 * math.exp(c2 * (1 - w))


def test_phi_of_one_is_one_on_both_branches():
    log_w = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(vespo_phi(log_w, torch.tensor([1.0, -1.0], dtype=torch.float64)),
                       torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("adv, kernel", [(1.0, POS), (-1.0, NEG), (0.0, POS)])
def test_maximum_is_the_closed_form(adv, kernel):
    c1, c2 = kernel
    w = torch.linspace(1e-3, 6.0, 200_001, dtype=torch.float64)
    phi = vespo_phi(w.log(), torch.full_like(w, adv))
    phi_max = (c1 / c2) ** c1 * math.exp(c2 - c1)
    assert phi.max().item() == pytest.approx(phi_max, rel=1e-9)
    assert w[phi.argmax()].item() == pytest.approx(c1 / c2, abs=1e-4)
    at_peak = vespo_phi(torch.tensor([math.log(c1 / c2)], dtype=torch.float64), torch.tensor([adv]))
    assert at_peak.item() == pytest.approx(phi_max, rel=1e-12)


@pytest.mark.parametrize("kernel, k_expected", [(POS, 2.46), (NEG, 1.0)])
def test_variance_constant_k(kernel, k_expected):
    """K = sup_w phi(w)/w = ((c1-1)/c2)^(c1-1) e^(c2-c1+1) (ALGORITHMS.md 3.1)."""
    c1, c2 = kernel
    k_closed = ((c1 - 1) / c2) ** (c1 - 1) * math.exp(c2 - c1 + 1)
    assert k_closed == pytest.approx(k_expected, abs=5e-3)
    w = torch.linspace(1e-3, 8.0, 400_001, dtype=torch.float64)
    adv = torch.full_like(w, 1.0 if kernel == POS else -1.0)
    assert (vespo_phi(w.log(), adv) / w).max().item() == pytest.approx(k_closed, rel=1e-6)


@pytest.mark.parametrize("w, adv, expected", [(0.5, 1, 1.12), (2.0, 1, 0.20), (0.5, -1, 0.34), (2.0, -1, 1.08)])
def test_quoted_values(w, adv, expected):
    phi = vespo_phi(torch.tensor([math.log(w)], dtype=torch.float64), torch.tensor([float(adv)]))
    assert phi.item() == pytest.approx(expected, abs=5e-3)
    c1, c2 = POS if adv >= 0 else NEG
    assert phi.item() == pytest.approx(phi_of(w, c1, c2), rel=1e-12)


def test_extreme_and_non_finite_log_weights():
    log_w = torch.tensor([20.0, -20.0, 1e6, -1e6, float("nan"), float("inf"), -float("inf")],
                         dtype=torch.float64)
    phi = vespo_phi(log_w, torch.ones_like(log_w))
    assert torch.isfinite(phi).all() and (phi >= 0).all()
    assert phi[0].item() == 0.0  # W = e^20: log phi ~ -1.5e9
    assert phi[2].item() == phi[0].item() and phi[3].item() == phi[1].item()  # clamped at +-20
    # W = e^-20 sits below the release's 1e-8 floor inside the log
    assert phi[1].item() == pytest.approx(math.exp(2 * math.log(1e-8) + 3 * (1 - math.exp(-20))), rel=1e-9)
    assert phi[4].item() == 0.0


def test_phi_is_detached():
    log_w = torch.tensor([0.3], requires_grad=True)
    assert not vespo_phi(log_w, torch.ones(1)).requires_grad


@settings(max_examples=60, deadline=None)
@given(log_w=st.floats(-30, 30), adv=st.floats(-5, 5))
def test_phi_matches_the_kernel(log_w, adv):
    phi = vespo_phi(torch.tensor([log_w], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64))
    c1, c2 = POS if adv >= 0 else NEG
    lw = max(min(log_w, 20.0), -20.0)
    expected = math.exp(c1 * max(lw, math.log(1e-8)) + c2 * (1 - math.exp(lw)))
    assert phi.item() == pytest.approx(expected, rel=1e-12, abs=1e-300)

"""k1 / k2 / k3 estimators and the exact full-vocabulary KL (ALGORITHMS.md 1.8)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms.kl import exact_kl_from_logits, kl_k1, kl_k2, kl_k3

F64 = torch.float64
log_ratios = st.floats(-20.0, 20.0, allow_nan=False)


def _categoricals(seed: int, vocab: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=gen, dtype=F64), torch.randn(vocab, generator=gen, dtype=F64)


def test_known_values():
    lr = torch.tensor([math.log(100.0), math.log(0.01)], dtype=F64)
    k3 = kl_k3(lr)
    assert k3.tolist() == pytest.approx([99 - math.log(100), -0.99 + math.log(100)], abs=1e-12)
    assert [round(v, 1) for v in k3.tolist()] == [94.4, 3.6]  # ALGORITHMS.md 1.8
    assert kl_k1(lr).tolist() == [-math.log(100.0), -math.log(0.01)]
    assert kl_k2(lr).tolist() == pytest.approx([0.5 * math.log(100) ** 2] * 2, abs=1e-12)


def test_k3_keeps_precision_near_zero():
    # exp(x) - 1 - x would cancel to 0 in float64 at x = 1e-9; k3 = x^2/2 + x^3/6 + ...
    x = torch.tensor([1e-9, -1e-9], dtype=F64)
    assert kl_k3(x).tolist() == pytest.approx([5e-19, 5e-19], rel=1e-8)


@settings(max_examples=200, deadline=None)
@given(log_ratios)
def test_k3_nonnegative_and_k2_symmetric(x):
    lr = torch.tensor([x, -x], dtype=F64)
    assert (kl_k3(lr) >= 0).all()
    assert (kl_k2(lr) >= 0).all()
    k2 = kl_k2(lr)
    assert k2[0] == k2[1]  # k2(r) = k2(1/r)
    assert kl_k3(lr[:1]).item() == pytest.approx(math.exp(x) - 1 - x, rel=1e-12, abs=1e-15)


def test_k1_k3_expectations_are_exact_kl():
    """Enumerating y ~ q: E_q[k1] = E_q[k3] = KL(q || p); E_q[k2] is not (it is biased)."""
    for seed in range(5):
        lq, lp = _categoricals(seed)
        log_q, log_p = lq.log_softmax(-1), lp.log_softmax(-1)
        q = log_q.exp()
        kl = float((q * (log_q - log_p)).sum())
        lr = log_p - log_q
        assert float((q * kl_k1(lr)).sum()) == pytest.approx(kl, abs=1e-12)
        assert float((q * kl_k3(lr)).sum()) == pytest.approx(kl, abs=1e-12)
        assert float((q * kl_k2(lr)).sum()) != pytest.approx(kl, abs=1e-6)


def test_sample_means_approximate_kl():
    """Sample means of k1 and k3 over n draws from q land within 5 exact standard errors of KL."""
    n = 200_000
    lq, lp = _categoricals(7)
    log_q, log_p = lq.log_softmax(-1), lp.log_softmax(-1)
    q = log_q.exp()
    kl = float((q * (log_q - log_p)).sum())
    y = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))
    for k in (kl_k1, kl_k3):
        values = k(log_p - log_q)
        std_err = math.sqrt(float((q * (values - kl) ** 2).sum()) / n)  # exact Var_q[k] / n
        assert abs(float(values[y].mean()) - kl) < 5 * std_err


def test_exact_kl_matches_brute_force_and_torch():
    gen = torch.Generator().manual_seed(1)
    lq, lp = torch.randn(2, 3, 6, generator=gen, dtype=F64), torch.randn(2, 3, 6, generator=gen, dtype=F64)
    out = exact_kl_from_logits(lq, lp)
    assert out.shape == (2, 3) and out.dtype == F64
    for i in range(2):
        for j in range(3):
            zq = sum(math.exp(v) for v in lq[i, j].tolist())
            zp = sum(math.exp(v) for v in lp[i, j].tolist())
            brute = 0.0
            for a, b in zip(lq[i, j].tolist(), lp[i, j].tolist(), strict=True):
                qv, pv = math.exp(a) / zq, math.exp(b) / zp
                brute += qv * math.log(qv / pv)
            assert out[i, j].item() == pytest.approx(brute, abs=1e-12)
    dist = torch.distributions
    ref = dist.kl_divergence(dist.Categorical(logits=lq), dist.Categorical(logits=lp))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_exact_kl_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(2)
    lq, lp = torch.randn(3, 5, 11, generator=gen, dtype=F64), torch.randn(3, 5, 11, generator=gen, dtype=F64)
    full = exact_kl_from_logits(lq, lp)
    for chunk in (1, 2, 7, 15, 100):
        assert torch.allclose(exact_kl_from_logits(lq, lp, chunk_size=chunk), full, rtol=0, atol=1e-14)


def test_exact_kl_zero_for_identical_logits_and_temperature_applied():
    gen = torch.Generator().manual_seed(3)
    lq, lp = torch.randn(4, 9, generator=gen, dtype=F64), torch.randn(4, 9, generator=gen, dtype=F64)
    assert exact_kl_from_logits(lq, lq).abs().max().item() < 1e-15
    dist = torch.distributions
    for temp in (0.5, 2.0):
        ref = dist.kl_divergence(dist.Categorical(logits=lq / temp), dist.Categorical(logits=lp / temp))
        assert torch.allclose(exact_kl_from_logits(lq, lp, temperature=temp), ref, rtol=0, atol=1e-12)
    assert not torch.allclose(exact_kl_from_logits(lq, lp, temperature=2.0), exact_kl_from_logits(lq, lp))


def test_exact_kl_upcasts_low_precision():
    gen = torch.Generator().manual_seed(4)
    lq, lp = torch.randn(5, 32, generator=gen).bfloat16(), torch.randn(5, 32, generator=gen).bfloat16()
    out = exact_kl_from_logits(lq, lp)
    assert out.dtype == torch.float32
    assert torch.equal(out, exact_kl_from_logits(lq.float(), lp.float()))


def test_exact_kl_zero_probability_tokens():
    """-inf logits in q contribute 0; q > 0 where p = 0 gives +inf."""
    lq = torch.tensor([0.3, -math.inf, 1.0], dtype=F64)
    lp = torch.tensor([0.1, 2.0, -0.4], dtype=F64)
    q, p = lq.softmax(-1), lp.softmax(-1)
    expected = float(q[0] * (q[0] / p[0]).log() + q[2] * (q[2] / p[2]).log())
    assert exact_kl_from_logits(lq, lp).item() == pytest.approx(expected, abs=1e-12)
    assert exact_kl_from_logits(lp, lq).item() == math.inf


def test_exact_kl_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        exact_kl_from_logits(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        exact_kl_from_logits(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        exact_kl_from_logits(x, x, chunk_size=0)


def test_exact_kl_gradient():
    """Autograd matches the closed form and stays finite at -inf logits.

    With a = logits_q / tau, b = logits_p / tau: d KL / d logits_p = (p - q) / tau and
    d KL / d logits_q = q (log q - log p - KL) / tau.
    """
    gen = torch.Generator().manual_seed(5)
    tau = 1.5
    lq = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    lp = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    kl = exact_kl_from_logits(lq, lp, temperature=tau)
    kl.sum().backward()
    log_q, log_p = (lq.detach() / tau).log_softmax(-1), (lp.detach() / tau).log_softmax(-1)
    q, p = log_q.exp(), log_p.exp()
    assert torch.allclose(lp.grad, (p - q) / tau, rtol=0, atol=1e-14)
    assert torch.allclose(lq.grad, q * (log_q - log_p - kl.detach()[:, None]) / tau, rtol=0, atol=1e-14)
    masked = torch.tensor([[0.2, -math.inf, 0.7], [-math.inf, 1.0, -0.3]], dtype=F64, requires_grad=True)
    other = (masked.detach() + 0.1).requires_grad_()  # same support
    exact_kl_from_logits(masked, other).sum().backward()
    assert masked.grad.isfinite().all() and other.grad.isfinite().all()

"""TRM sequence masks and the paper's bounds (ALGORITHMS.md section 4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms.sequence_ops import WholeSequences
from megatron_rl.algorithms.trm import trm_bounds, trm_mask, trm_sequence_stats

F64 = torch.float64
PAPER = dict(T=4096, delta=1e-4, eps=5e-3, d_kl_seq=0.01, d_tv_seq=0.05)

# ---------------------------------------------------------------------------------------- bounds


def test_paper_example():
    b = trm_bounds(**PAPER)
    # The paper's 35.0 is the closed form (4/3) T^{3/2} delta = 34.953, the integral of the exact
    # sum 2 delta sum_{k<T} sqrt(k) = 34.946 (which rounds to 34.9) and so a looser valid bound.
    closed_form = 4 / 3 * 4096**1.5 * 1e-4
    assert round(closed_form, 1) == 35.0
    assert b["pm_kl"] == pytest.approx(2e-4 * sum(math.sqrt(k) for k in range(4096)), rel=1e-12)
    assert 0 < closed_form - b["pm_kl"] < 1e-3 * closed_form
    assert round(b["pm_tv"], 1) == 24.7
    assert round(b["mix_kl"], 1) == 8.2
    assert b["mix_tv"] == pytest.approx(4.096, abs=1e-12)
    assert round(b["coupling"], 1) == 79.9
    assert b["classical"] == pytest.approx(2 * 4096 * 4095 * 25e-6, abs=1e-9)  # TV form, 838.7
    assert b["unified"] == b["mix_tv"]
    assert set(b) == {"classical", "pm_kl", "pm_tv", "mix_kl", "mix_tv", "coupling", "unified"}
    kl_only = trm_bounds(4096, 1e-4)
    assert round(kl_only["classical"]) == 1677 and round(kl_only["coupling"], 1) == 113.8
    assert int(kl_only["classical"] / b["unified"]) == 409  # the paper's "409x" (1677.3 / 4.096 = 409.5)


def test_missing_inputs_drop_bounds():
    assert set(trm_bounds(10, 0.01)) == {"classical", "pm_kl", "coupling", "unified"}
    assert set(trm_bounds(10, 0.01, d_tv_seq=0.5)) == {"classical", "pm_kl", "coupling", "unified"}
    assert "mix_kl" in trm_bounds(10, 0.01, d_kl_seq=0.1)
    assert "adaptive" in trm_bounds(10, 0.01, d_tv_tok_mean=0.01)


def _reference_bounds(T, delta, eps, d_kl_seq, d_tv_seq, d_bar):
    """The formulas of ALGORITHMS.md 4.2 as plain Python loops over t = 1..T."""
    s = min(1.0, math.sqrt(delta / 2))
    e = s if eps is None else eps
    pm = sum(min(1.0, math.sqrt((t - 1) * delta / 2)) for t in range(1, T + 1))
    out = {
        "classical": T * (T - 1) * delta if eps is None else 2 * T * (T - 1) * eps**2,
        "pm_kl": 4 * s * pm,
        "coupling": 4 * e * sum(min(1.0, (t - 1) * e) for t in range(1, T + 1)),
        "mix_kl": 4 * T * s * min(1.0, math.sqrt(d_kl_seq / 2)),
        "adaptive": 4 * sum(d_bar[t - 1] * min(1.0, (T - t) * e, math.sqrt((T - t) * delta / 2))
                            for t in range(1, T + 1)),
    }
    if eps is not None:
        out.update(pm_tv=4 * eps * pm, mix_tv=4 * T * eps * min(1.0, d_tv_seq))
    out["unified"] = min(out.values())
    return out


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 60), delta=st.floats(1e-6, 5.0), eps=st.one_of(st.none(), st.floats(1e-4, 1.0)),
       d_kl_seq=st.floats(0.0, 5.0), d_tv_seq=st.floats(0.0, 1.0), data=st.data())
def test_bounds_match_loops(T, delta, eps, d_kl_seq, d_tv_seq, data):
    d_bar = data.draw(st.lists(st.floats(0.0, 1.0), min_size=T, max_size=T))
    got = trm_bounds(T, delta, eps, d_kl_seq, d_tv_seq, d_bar)
    expected = _reference_bounds(T, delta, eps, d_kl_seq, d_tv_seq, d_bar)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_adaptive_with_constant_mean_tv_is_pm_sum():
    """D̄_t = c and Pinsker eps: the weights are min(1, sqrt((T-t) delta/2)), the PM sum reversed."""
    b = trm_bounds(4096, 1e-4, d_tv_tok_mean=5e-3)
    assert b["adaptive"] == pytest.approx(trm_bounds(**PAPER)["pm_tv"], rel=1e-12)
    per_position = trm_bounds(4096, 1e-4, d_tv_tok_mean=[5e-3] * 4096)["adaptive"]
    assert per_position == pytest.approx(b["adaptive"], rel=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(T=0, delta=0.1), "T"), (dict(T=2.0, delta=0.1), "T"), (dict(T=True, delta=0.1), "T"),
    (dict(T=4, delta=0.0), "delta"), (dict(T=4, delta=math.nan), "delta"),
    (dict(T=4, delta=math.inf), "delta"),
    (dict(T=4, delta=0.1, eps=0.0), "eps"), (dict(T=4, delta=0.1, eps=1.5), "eps"),
    (dict(T=4, delta=0.1, d_kl_seq=-1.0), "d_kl_seq"), (dict(T=4, delta=0.1, d_tv_seq=1.5), "d_tv_seq"),
    (dict(T=4, delta=0.1, d_tv_tok_mean=[0.1] * 3), "d_tv_tok_mean"),
    (dict(T=4, delta=0.1, d_tv_tok_mean=-0.1), "d_tv_tok_mean"),
])
def test_bounds_validate_inputs(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        trm_bounds(**kwargs)


# ----------------------------------------------------------------------------------------- masks


def _batch():
    """[4, 1000] log-ratios, rows: clean, one spike, uniform drift, empty; row lengths differ."""
    lr = torch.zeros(4, 1000, dtype=F64)
    mask = torch.zeros(4, 1000, dtype=torch.bool)
    mask[0, :1000] = mask[1, :1000] = True
    mask[2, :600] = True
    lr[1, 500] = 0.5  # k2 = 0.125 > 0.05; mean k3 = (e^0.5 - 1.5) / 1000 = 1.49e-4 < 1e-3
    lr[2, :600] = 0.1  # k2 = 0.005 <= 0.05; mean k3 = e^0.1 - 1.1 = 5.17e-3 > 1e-3
    return lr, mask


def test_max_and_avg_criteria_by_hand():
    lr, mask = _batch()
    assert trm_mask(lr, mask, max_k2=0.05).tolist() == [True, False, True, True]
    assert trm_mask(lr, mask, avg_k3=1e-3).tolist() == [True, True, False, True]
    assert trm_mask(lr, mask, max_k2=0.05, avg_k3=1e-3).tolist() == [True, False, False, True]
    assert trm_mask(lr, mask, max_k2=0.2, avg_k3=6e-3).tolist() == [True, True, True, True]


def test_sequence_stats_by_hand():
    lr, mask = _batch()
    stats = trm_sequence_stats(lr, mask)
    assert stats["max_k2"].tolist() == pytest.approx([0.0, 0.125, 0.005, 0.0], abs=1e-15)
    k3 = lambda x: math.exp(x) - 1 - x  # noqa: E731
    expected = [0.0, k3(0.5) / 1000, k3(0.1), 0.0]
    assert stats["mean_k3"].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert stats["length"].tolist() == [1000.0, 1000.0, 600.0, 0.0]


def test_padding_values_do_not_matter():
    lr, mask = _batch()
    reference = trm_sequence_stats(lr, mask)
    for fill in (1e4, -1e4, math.inf, math.nan):
        dirty = lr.masked_fill(~mask, fill)
        for key, value in trm_sequence_stats(dirty, mask).items():
            assert torch.equal(value, reference[key]), (fill, key)
        assert trm_mask(dirty, mask, max_k2=0.05, avg_k3=1e-3).tolist() == [True, False, False, True]


def test_float_mask_equals_bool_mask_and_nan_rejects():
    lr, mask = _batch()
    assert torch.equal(trm_mask(lr, mask.double(), max_k2=0.05), trm_mask(lr, mask, max_k2=0.05))
    lr[0, 3] = math.nan
    assert trm_mask(lr, mask, max_k2=0.05).tolist()[0] is False
    assert trm_mask(lr, mask, avg_k3=1e-3).tolist()[0] is False


def test_mask_is_detached_and_upcasts():
    lr, mask = _batch()
    lr = lr.float().bfloat16().requires_grad_()
    keep = trm_mask(lr, mask, max_k2=0.05, avg_k3=1e-3)
    assert keep.dtype == torch.bool and not keep.requires_grad
    assert keep.tolist() == [True, False, False, True]
    stats = trm_sequence_stats(lr, mask)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("threshold, low, high", [(0.05, 0.729, 1.372), (0.1, 0.639, 1.564)])
def test_per_token_max_k2_thresholds(threshold, low, high):
    """ALGORITHMS.md 4.4: k2 <= 0.05 <=> rho in [0.729, 1.372]; k2 <= 0.1 <=> rho in [0.639, 1.564]."""
    edge = math.sqrt(2 * threshold)
    assert (round(math.exp(-edge), 3), round(math.exp(edge), 3)) == (low, high)
    rho = torch.tensor([[math.exp(-edge) - 1e-9], [math.exp(-edge) + 1e-9],
                        [math.exp(edge) - 1e-9], [math.exp(edge) + 1e-9]], dtype=F64)
    keep = trm_mask(rho.log(), torch.ones_like(rho, dtype=torch.bool), max_k2=threshold)
    assert keep.tolist() == [False, True, True, False]


@pytest.mark.parametrize("threshold, low, high", [(0.001, 0.956, 1.045), (0.002, 0.938, 1.065)])
def test_per_token_avg_k3_thresholds(threshold, low, high):
    """ALGORITHMS.md 4.4: token-level k3 = 0.001 <=> rho in [0.956, 1.045]; 0.002 <=> [0.938, 1.065]."""
    rho = torch.tensor([[low - 1e-3], [low + 1e-3], [high - 1e-3], [high + 1e-3]], dtype=F64)
    keep = trm_mask(rho.log(), torch.ones_like(rho, dtype=torch.bool), avg_k3=threshold)
    assert keep.tolist() == [False, True, True, False]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31), st.floats(1e-3, 1.0),
       st.floats(1e-4, 0.1))
def test_mask_matches_per_sequence_loop(batch, length, seed, max_k2, avg_k3):
    gen = torch.Generator().manual_seed(seed)
    lr = 0.5 * torch.randn(batch, length, generator=gen, dtype=F64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    keep = trm_mask(lr, mask, max_k2=max_k2, avg_k3=avg_k3)
    for i in range(batch):
        x = lr[i][mask[i]].tolist()
        ok_max = max((0.5 * v * v for v in x), default=0.0) <= max_k2
        ok_avg = sum(math.exp(v) - 1 - v for v in x) / max(len(x), 1) <= avg_k3
        assert keep[i].item() == (ok_max and ok_avg)


class _Recording(WholeSequences):
    """Single-rank reductions that record which ones are called (the CP contract's entry points)."""

    def __init__(self):
        self.calls = []

    def seq_sum(self, x):
        self.calls.append("seq_sum")
        return super().seq_sum(x)

    def seq_max(self, x):
        self.calls.append("seq_max")
        return super().seq_max(x)


def test_token_reductions_go_through_ops():
    lr, mask = _batch()
    for kwargs, calls in ((dict(max_k2=0.05), ["seq_max"]), (dict(avg_k3=1e-3), ["seq_sum", "seq_sum"])):
        ops = _Recording()
        assert torch.equal(trm_mask(lr, mask, ops=ops, **kwargs), trm_mask(lr, mask, **kwargs))
        assert ops.calls == calls


def test_mask_rejects_bad_arguments():
    lr, mask = _batch()
    with pytest.raises(ValueError, match="at least one criterion"):
        trm_mask(lr, mask)
    with pytest.raises(ValueError, match="^max_k2"):
        trm_mask(lr, mask, max_k2=0.0)
    with pytest.raises(ValueError, match="^avg_k3"):
        trm_mask(lr, mask, avg_k3=-1.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        trm_mask(lr, mask[:, :10], max_k2=0.05)

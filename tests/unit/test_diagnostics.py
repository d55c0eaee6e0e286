"""The loss diagnostics (algorithms/diagnostics.py) against direct loops over hand-built inputs
(float64, 1e-6), and their combination over micro-batches by the metrics' reductions."""

import math

import numpy as np
import pytest
import torch

from megatron_rl.algorithms.hyperparams import KPOConfig, PolicyLossConfig, TRMConfig
from megatron_rl.algorithms.kalman import kalman_filter
from megatron_rl.algorithms.metrics import Metrics, accumulate, combine, finalize, quantile
from megatron_rl.algorithms.policy_loss import compute_policy_loss
from megatron_rl.algorithms.sequence_ops import WholeSequences

F64 = torch.float64
TOL = 1e-6
NAN = float("nan")

# Rows: flips at known places, a zero (no flip with either neighbour), length 1, empty, padding.
Z = torch.tensor([
    [0.1, -0.2, 0.3, 0.0, -0.1, 0.2, NAN, NAN],   # 5 pairs; flips (0.1,-0.2), (-0.2,0.3), (-0.1,0.2)
    [-0.3, -0.1, -0.2, 0.4, 0.5, -0.5, 0.1, 0.2],  # 7 pairs; flips at t = 3, 5, 6
    [0.7, NAN, NAN, NAN, NAN, NAN, NAN, NAN],      # length 1: no pair
    [NAN] * 8,                                      # empty
], dtype=F64)
LENGTHS = [6, 8, 1, 0]
ADV = [1.0, -0.5, 2.0, 0.3]


def mask_of(lengths, width=8):
    mask = torch.zeros(len(lengths), width, dtype=F64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask


def loop_switches(values, lengths):
    """(flips, pairs) by walking each sequence's adjacent response tokens."""
    flips = pairs = 0
    for row, n in enumerate(lengths):
        for t in range(1, n):
            pairs += 1
            flips += float(values[row][t - 1]) * float(values[row][t]) < 0
    return flips, pairs


def loop_moments(values, lengths):
    """(mean, population variance, mean |v|, std |v|) over the response tokens, two-pass."""
    tokens = [float(values[row][t]) for row, n in enumerate(lengths) for t in range(n)]
    mean = sum(tokens) / len(tokens)
    abs_mean = sum(abs(v) for v in tokens) / len(tokens)
    return (mean, sum((v - mean) ** 2 for v in tokens) / len(tokens), abs_mean,
            math.sqrt(sum((abs(v) - abs_mean) ** 2 for v in tokens) / len(tokens)))


def kpo_batch(z=Z, lengths=LENGTHS, adv=ADV):
    """log_prob - old_log_prob = z on response tokens; padding NaN in log_prob (must not matter)."""
    mask = mask_of(lengths, z.shape[1])
    old = -torch.linspace(0.5, 2.0, z.numel(), dtype=F64).view_as(z)
    log_prob = torch.where(mask.bool(), old + z.nan_to_num(), NAN)
    advantages = torch.tensor(adv, dtype=F64)[:, None].expand_as(z).contiguous()
    return log_prob, old, advantages, mask


def test_switch_frequency_of_z_and_x_hat_against_a_loop():
    log_prob, old, adv, mask = kpo_batch()
    q = 0.01
    _, metrics = compute_policy_loss("kpo", log_prob, old, adv, mask, config=PolicyLossConfig(kpo=KPOConfig(q=q)))
    assert loop_switches(Z, LENGTHS) == (6, 12)  # the hand count of the rows above
    assert metrics["kpo/z_switch_freq"].item() == pytest.approx(6 / 12, abs=TOL)
    x_hat = kalman_filter(Z.nan_to_num(), mask, q)
    flips, pairs = loop_switches(x_hat, LENGTHS)
    assert 0 < flips < 6  # the filter smooths some flips away, not all
    assert metrics["kpo/x_hat_switch_freq"].item() == pytest.approx(flips / pairs, abs=TOL)
    assert metrics.weights["kpo/z_switch_freq"].item() == 12


def test_switch_frequency_with_prompt_columns_and_ragged_starts():
    """Rows [prompt | response | padding]: prompt-response pairs do not count."""
    log_prob, old, adv, mask = kpo_batch()
    starts = torch.tensor([3, 0, 5, 2])
    width = 8 + 5

    def place(t, fill):
        out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
        for row, start in enumerate(starts.tolist()):
            out[row, start:start + 8] = t[row]
        return out

    _, metrics = compute_policy_loss("kpo", place(log_prob, -0.5), place(old, -1.0), place(adv, 0.0), place(mask, 0.0),
                                     cp_group=WholeSequences(starts), config=PolicyLossConfig(kpo=KPOConfig(q=0.3)))
    _, plain = compute_policy_loss("kpo", log_prob, old, adv, mask, config=PolicyLossConfig(kpo=KPOConfig(q=0.3)))
    for key in ("kpo/z_switch_freq", "kpo/x_hat_switch_freq", "kpo/z_var", "kpo/x_hat_var"):
        assert metrics[key].item() == pytest.approx(plain[key].item(), abs=1e-12), key


def test_variances_and_abs_std_against_a_loop():
    log_prob, old, adv, mask = kpo_batch()
    _, metrics = compute_policy_loss("kpo", log_prob, old, adv, mask, config=PolicyLossConfig(kpo=KPOConfig(q=0.3)))
    z_mean, z_var, z_abs_mean, _ = loop_moments(Z, LENGTHS)
    x_mean, x_var, x_abs_mean, x_abs_std = loop_moments(kalman_filter(Z.nan_to_num(), mask, 0.3), LENGTHS)
    expected = {"kpo/z_mean": z_mean, "kpo/z_var": z_var, "kpo/z_abs_mean": z_abs_mean, "kpo/x_hat_mean": x_mean,
                "kpo/x_hat_var": x_var, "kpo/x_hat_abs_mean": x_abs_mean, "kpo/x_hat_abs_std": x_abs_std}
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, abs=TOL), key
    assert 0 < x_var < z_var


def test_no_pairs_gives_zero_switch_frequency_with_zero_weight():
    log_prob, old, adv, mask = kpo_batch(Z[2:], LENGTHS[2:], ADV[2:])  # length 1 and empty
    _, metrics = compute_policy_loss("kpo", log_prob, old, adv, mask)
    assert metrics["kpo/z_switch_freq"].item() == 0 and metrics.weights["kpo/z_switch_freq"].item() == 0


def test_quantile_against_numpy_and_by_hand():
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert quantile([5.0], 0.9) == 5.0
    assert quantile(range(1, 12), 0.1) == pytest.approx(2.0, abs=1e-12)
    values = np.random.default_rng(0).normal(size=37)
    for level in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert quantile(values.tolist(), level) == pytest.approx(float(np.quantile(values, level)), abs=1e-12)


def loop_phi(log_w, adv):
    c1, c2 = (2.0, 3.0) if adv >= 0 else (3.0, 2.0)
    w = math.exp(max(-20.0, min(20.0, log_w)))
    return w**c1 * math.exp(c2 * (1 - w))


def test_vespo_phi_quantiles_over_nonempty_sequences():
    lengths = [8, 3, 0, 5, 1, 7, 2]
    gen = torch.Generator().manual_seed(3)
    z = 0.3 * torch.randn(len(lengths), 8, generator=gen, dtype=F64)
    adv = [1.0, -0.5, 2.0, -1.0, 0.3, -2.0, 0.7]
    log_prob, old, advantages, mask = kpo_batch(z, lengths, adv)
    _, metrics = compute_policy_loss("vespo", log_prob, old, advantages, mask)
    phis = sorted(loop_phi(sum(float(z[row, t]) for t in range(n)), adv[row])
                  for row, n in enumerate(lengths) if n > 0)
    for level in (0.1, 0.5, 0.9):
        h = (len(phis) - 1) * level
        low = int(h)
        expected = phis[low] + (h - low) * (phis[min(low + 1, len(phis) - 1)] - phis[low])
        assert metrics[f"vespo/phi_p{round(level * 100)}"].item() == pytest.approx(expected, abs=TOL)


def test_quantiles_of_micro_batches_are_those_of_the_union():
    """Pooling is exact where averaging the parts' medians is not."""
    parts = [Metrics().add_quantiles("v", torch.tensor(values, dtype=F64), (0.5,))
             for values in ([1.0, 2.0, 3.0], [10.0], [4.0, 5.0])]
    assert finalize(combine([accumulate(m, 1.0, 1.0) for m in parts]))["v_p50"] == 3.5
    assert sum(m["v_p50"].item() for m in parts) / 3 != 3.5
    assert "v_p50" not in Metrics().add_quantiles("v", torch.zeros(0), (0.5,))


def loop_bucket(n):
    k = 0
    while 2 ** (k + 1) <= n:
        k += 1
    return f"{2**k}-{2 ** (k + 1) - 1}"


def test_trm_rejection_rate_by_power_of_two_length_bucket():
    lengths = [1, 2, 3, 3, 4, 7, 8, 15, 16, 0, 5]
    width = 16
    z = torch.full((len(lengths), width), 0.01, dtype=F64)
    rejected_rows = {1, 3, 5, 8}  # one token with k2 = 0.5 * 0.4^2 = 0.08 > max_k2
    for row in rejected_rows:
        z[row, lengths[row] - 1] = 0.4
    log_prob, old, adv, mask = kpo_batch(z, lengths, [1.0] * len(lengths))
    config = PolicyLossConfig(trm=TRMConfig(max_k2=0.05))
    _, metrics = compute_policy_loss("trm", log_prob, old, adv, mask, config=config)
    buckets: dict[str, list[int]] = {}
    for row, n in enumerate(lengths):
        if n > 0:
            buckets.setdefault(loop_bucket(n), []).append(row in rejected_rows)
    assert set(buckets) == {"1-1", "2-3", "4-7", "8-15", "16-31"}
    got = {key.removeprefix("trm/reject_rate_len_"): value.item() for key, value in metrics.items()
           if key.startswith("trm/reject_rate_len_")}
    assert set(got) == set(buckets)
    for bucket, flags in buckets.items():
        assert got[bucket] == pytest.approx(sum(flags) / len(flags), abs=TOL), bucket
        assert metrics.weights[f"trm/reject_rate_len_{bucket}"].item() == len(flags)
    assert got["2-3"] == pytest.approx(2 / 3, abs=TOL)


def test_bucket_rates_of_micro_batches_combine_exactly():
    lengths = [1, 2, 3, 3, 4, 7]
    z = torch.full((6, 8), 0.01, dtype=F64)
    z[1, 0] = z[3, 2] = 0.4
    log_prob, old, adv, mask = kpo_batch(z, lengths, [1.0] * 6)
    config = PolicyLossConfig(trm=TRMConfig(max_k2=0.05))
    _, whole = compute_policy_loss("trm", log_prob, old, adv, mask, config=config)
    parts = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        _, m = compute_policy_loss("trm", log_prob[rows], old[rows], adv[rows], mask[rows], config=config)
        parts.append(accumulate(m, mask[rows].sum().item(), (mask[rows].sum(-1) > 0).sum().item()))
    combined = finalize(combine(parts))
    for key in whole:
        assert combined[key] == pytest.approx(whole[key].item(), abs=1e-12), key


def test_entropy_is_the_mean_over_response_tokens():
    log_prob, old, adv, mask = kpo_batch()
    entropy = torch.where(mask.bool(), torch.arange(32, dtype=F64).view(4, 8) / 10, NAN)
    _, metrics = compute_policy_loss("ppo", log_prob, old, adv, mask, entropy=entropy)
    tokens = [float(entropy[row, t]) for row, n in enumerate(LENGTHS) for t in range(n)]
    assert metrics["policy/entropy"].item() == pytest.approx(sum(tokens) / len(tokens), abs=TOL)
    with pytest.raises(ValueError, match=r"entropy has shape \(4, 7\), expected \(4, 8\)"):
        compute_policy_loss("ppo", log_prob, old, adv, mask, entropy=entropy[:, :7])


def test_weighted_and_quantile_need_their_own_add():
    with pytest.raises(ValueError, match="weighted: add_weighted"):
        Metrics().add("weighted", {"x": torch.tensor(1.0)})

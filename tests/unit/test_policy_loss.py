"""The policy-loss registry against independent restatements of ALGORITHMS.md (float64)."""

import math

import pytest
import torch

from megatron_rl.algorithms.aggregation import GlobalCounts
from megatron_rl.algorithms.hyperparams import (
    CorrectionsConfig,
    GeoMaskConfig,
    GSPOConfig,
    IcePopConfig,
    KPOConfig,
    PolicyLossConfig,
    TRMConfig,
    TruncatedISConfig,
)
from megatron_rl.algorithms.kalman import kalman_filter
from megatron_rl.algorithms.loss_inputs import NonFiniteInputError
from megatron_rl.algorithms.metrics import accumulate, combine, finalize
from megatron_rl.algorithms.policy_loss import POLICY_LOSSES, compute_policy_loss
from megatron_rl.algorithms.sequence_ops import WholeSequences
from megatron_rl.algorithms.vespo import vespo_phi

F64 = torch.float64
ADV = [1.0, -0.5, 2.0, -1.5]
LENGTHS = [6, 4, 1, 5]


def batch(seed=0, noise=0.1, lengths=LENGTHS, adv=ADV, length=6):
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    mask = torch.zeros(rows, length)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    log_prob = -torch.rand(rows, length, generator=gen, dtype=F64) - 0.1
    old = log_prob + noise * torch.randn(rows, length, generator=gen, dtype=F64)
    rollout = old + 0.5 * noise * torch.randn(rows, length, generator=gen, dtype=F64)
    advantages = torch.tensor(adv, dtype=F64)[:, None].expand(rows, length).clone()
    return log_prob, old, advantages, mask, rollout


def run(name, log_prob, old, adv, mask, rollout=None, **config):
    lp = log_prob.clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, rollout_log_prob=rollout,
                                        config=PolicyLossConfig(**config))
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics


def masked_token_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def seq_mean_token_mean(x, mask):
    n = mask.sum(-1)
    keep = n > 0
    return ((x * mask).sum(-1)[keep] / n[keep]).mean()


def test_ppo_is_the_dual_clip_surrogate():
    log_prob, old, adv, mask, _ = batch(noise=0.4)
    ratio = (log_prob - old).exp()
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    expected = torch.where(adv < 0, torch.minimum(clipped, -adv * 3.0), clipped)
    loss, _, metrics = run("ppo", log_prob, old, adv, mask)
    assert loss.item() == pytest.approx(masked_token_mean(expected, mask).item(), rel=1e-12)
    frac = masked_token_mean((-adv * ratio.clamp(0.8, 1.2) > -adv * ratio).double(), mask)
    assert metrics["policy/clip_frac"].item() == pytest.approx(frac.item(), rel=1e-12)


def test_dual_clip_bounds_negative_advantages():
    log_prob = torch.zeros(1, 3, dtype=F64)
    old = torch.tensor([[-5.0, -5.0, 0.0]], dtype=F64)  # ratio e^5 on two tokens
    adv = torch.full((1, 3), -1.0, dtype=F64)
    loss, grad, metrics = run("ppo", log_prob, old, adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx((3.0 + 3.0 + 1.0) / 3, rel=1e-12)
    assert grad[0, :2].abs().max().item() == 0.0 and grad[0, 2].item() == pytest.approx(1 / 3)
    assert metrics["policy/dual_clip_frac"].item() == pytest.approx(2 / 3)


def test_dapo_is_ppo_with_clip_higher():
    log_prob, old, adv, mask, _ = batch(noise=0.4)
    dapo, _, _ = run("dapo", log_prob, old, adv, mask)
    ppo, _, _ = run("ppo", log_prob, old, adv, mask, ppo=PolicyLossConfig().dapo)
    assert dapo.item() == ppo.item()


def test_gspo_sequence_ratio_and_gradient():
    log_prob, old, adv, mask, _ = batch(noise=0.05)
    wide = GSPOConfig(eps_low=0.5, eps_high=0.5)
    loss, grad, _ = run("gspo", log_prob, old, adv, mask, gspo=wide)
    n = mask.sum(-1)
    s = (((log_prob - old) * mask).sum(-1) / n).exp()
    assert loss.item() == pytest.approx((-adv[:, 0] * s).mean().item(), rel=1e-12)
    expected_grad = (-adv[:, 0] * s / n)[:, None] * mask / len(LENGTHS)
    assert torch.allclose(grad, expected_grad, atol=1e-14)


@pytest.mark.parametrize("name, config", [
    ("gspo_token", dict(gspo=GSPOConfig(eps_low=0.9, eps_high=100.0))),
    ("kpo", dict(kpo=KPOConfig(q=1e-2, clip=False))),
    ("kpo", dict(kpo=KPOConfig(q=1e-2, eps_low=0.9, eps_high=100.0))),
])
def test_gradient_is_value_times_grad_log_pi(name, config):
    """d loss / d log pi_t = -A_t * (ratio value)_t / (n_i N): sg(ratio) grad log pi (autograd)."""
    log_prob, old, adv, mask, _ = batch(noise=0.2)
    _, grad, _ = run(name, log_prob, old, adv, mask, **config)
    n = mask.sum(-1, keepdim=True)
    if name == "kpo":
        value = kalman_filter(log_prob - old, mask, 1e-2).exp()
    else:
        value = (((log_prob - old) * mask).sum(-1, keepdim=True) / n).exp().expand_as(mask)
    expected = -adv * value / n * mask / len(LENGTHS)
    assert torch.allclose(grad, expected, atol=1e-14)


def test_kpo_loss_value_and_clip_on_filtered_ratio():
    log_prob, old, adv, mask, _ = batch(noise=0.3)
    p = KPOConfig(q=1e-2, eps_low=0.01, eps_high=0.01)
    loss, grad, metrics = run("kpo", log_prob, old, adv, mask, kpo=p)
    ratio = kalman_filter(log_prob - old, mask, 1e-2).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.99, 1.01))
    assert loss.item() == pytest.approx(seq_mean_token_mean(per_token, mask).item(), rel=1e-12)
    clipped = (-adv * ratio.clamp(0.99, 1.01) > -adv * ratio) & mask.bool()
    assert 0 < clipped.sum() < mask.sum()
    assert grad[clipped].abs().max().item() == 0.0
    assert metrics["kpo/x_hat_abs_max"].item() == pytest.approx(
        ratio.log().abs()[mask.bool()].max().item(), rel=1e-12)


def test_on_policy_batch_gives_unit_ratios():
    log_prob, _, adv, mask, _ = batch()
    for name in POLICY_LOSSES:
        _, _, metrics = run(name, log_prob, log_prob, adv, mask)
        assert metrics["policy/ratio_mean"].item() == pytest.approx(1.0, abs=1e-15), name
        assert metrics["kl/k3"].item() == 0.0
    _, _, metrics = run("kpo", log_prob, log_prob, adv, mask)
    assert metrics["kpo/x_hat_abs_max"].item() == 0.0 and metrics["policy/clip_frac"].item() == 0.0


def test_gmpo_clips_in_log_space_on_the_pessimistic_side():
    log_prob, old, adv, mask, _ = batch(noise=0.6)
    loss, _, metrics = run("gmpo", log_prob, old, adv, mask)
    z = log_prob - old
    sign = torch.sign(adv)
    z_hat = sign * torch.minimum(sign * z, sign * z.clamp(-0.4, 0.4))
    ratio = ((z_hat * mask).sum(-1) / mask.sum(-1)).exp()
    assert loss.item() == pytest.approx((-adv[:, 0] * ratio).mean().item(), rel=1e-12)
    assert 0 < metrics["policy/clip_frac"].item() < 1


def test_cispo_is_reinforce_with_a_detached_clipped_weight():
    log_prob, old, adv, mask, _ = batch(noise=0.4)
    loss, grad, _ = run("cispo", log_prob, old, adv, mask)
    weight = (log_prob - old).exp().clamp(max=1.28)
    assert loss.item() == pytest.approx(masked_token_mean(-weight * adv * log_prob, mask).item(), rel=1e-12)
    assert torch.allclose(grad, -weight * adv * mask / mask.sum(), atol=1e-14)


def test_sapo_soft_gate():
    log_prob, old, adv, mask, _ = batch(noise=0.4)
    loss, _, _ = run("sapo", log_prob, old, adv, mask)
    ratio = (log_prob - old).exp()
    tau = torch.where(adv > 0, 1.0, 1.05).to(F64)
    per_token = -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    assert loss.item() == pytest.approx(seq_mean_token_mean(per_token, mask).item(), rel=1e-12)


def test_vespo_reinforce_with_phi_of_the_unnormalised_sequence_weight():
    log_prob, old, adv, mask, _ = batch(noise=0.1)
    loss, grad, metrics = run("vespo", log_prob, old, adv, mask)
    log_w = ((log_prob - old) * mask).sum(-1)  # a sum: no 1/T
    phi = vespo_phi(log_w, adv[:, 0])
    assert loss.item() == pytest.approx(masked_token_mean(-phi[:, None] * adv * log_prob, mask).item(),
                                        rel=1e-12)
    assert torch.allclose(grad, -phi[:, None] * adv * mask / mask.sum(), atol=1e-14)
    assert metrics["vespo/phi_mean"].item() == pytest.approx(phi.mean().item(), rel=1e-12)


def test_trm_divides_by_all_sequences_including_rejected():
    log_prob, old, adv, mask, rollout = batch(noise=0.1)
    rollout[0, 2] = log_prob[0, 2] - 1.0  # k2 = 0.5 > 0.05: sequence 0 is rejected
    loss, grad, metrics = run("trm", log_prob, old, adv, mask, rollout)
    rho = (log_prob - rollout).exp() * mask
    keep = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=F64)
    expected = -(keep * adv[:, 0] * rho.sum(-1)).sum() / 4  # N = 4, not the 3 accepted
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert grad[0].abs().max().item() == 0.0
    assert torch.allclose(grad[1:], (-adv * rho / 4)[1:], atol=1e-14)
    assert metrics["trm/accept_rate"].item() == pytest.approx(0.75)
    for bound in ("pm_kl", "mix_kl", "coupling", "classical", "unified"):
        assert metrics[f"trm/bound_{bound}"].item() > 0


def test_trm_uses_pi_old_as_behaviour_without_rollout_log_probs():
    log_prob, old, adv, mask, _ = batch(noise=0.1)
    without, _, _ = run("trm", log_prob, old, adv, mask)
    with_old, _, _ = run("trm", log_prob, old, adv, mask, old.clone())
    assert without.item() == with_old.item()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregation_modes(mode):
    log_prob, old, adv, mask, _ = batch(noise=0.05)
    loss, _, _ = run("ppo", log_prob, old, adv, mask, loss_agg_mode=mode)
    per_token = -adv * (log_prob - old).exp()  # nothing clipped at this noise level
    sums, n = (per_token * mask).sum(-1), mask.sum(-1)
    expected = {
        "token-mean": sums.sum() / n.sum(),
        "seq-mean-token-mean": (sums / n).mean(),
        "seq-mean-token-sum": sums.mean(),
        "seq-mean-token-sum-norm": sums.sum() / mask.shape[-1],
    }[mode]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_empty_rows_and_nan_padding_change_nothing(name):
    log_prob, old, adv, mask, rollout = batch(noise=0.2)
    base, grad, _ = run(name, log_prob, old, adv, mask, rollout)
    pad = torch.full((1, 6), float("nan"), dtype=F64)
    grown = [torch.cat([t, pad]) for t in (log_prob, old, adv)]
    grown_mask = torch.cat([mask, torch.zeros(1, 6)])
    log_prob[mask == 0] = float("nan")
    loss, grown_grad, metrics = run(name, *grown, grown_mask, torch.cat([rollout, pad]))
    assert loss.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(grown_grad[:-1], grad, atol=1e-14) and grown_grad[-1].abs().max() == 0
    assert metrics["input/nonfinite_padding"].item() == 6 * 4 - 6 * 0  # the new row, in 4 tensors


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_length_one_and_fully_masked_batches(name):
    log_prob, old, adv, mask, rollout = batch(lengths=[1, 1], adv=[1.0, -1.0], length=3)
    loss, grad, _ = run(name, log_prob, old, adv, mask, rollout)
    assert torch.isfinite(loss) and grad[:, 1:].abs().max() == 0
    empty, grad, _ = run(name, log_prob, old, adv, torch.zeros_like(mask), rollout)
    assert empty.item() == 0.0 and grad.abs().max() == 0


@pytest.mark.parametrize("tensor", ["log_prob", "old", "adv", "rollout"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_on_a_response_token_is_a_clear_error(tensor, bad):
    inputs = dict(zip(["log_prob", "old", "adv", "mask", "rollout"], batch(), strict=True))
    inputs[tensor][2, 0] = bad
    name = {"old": "old_log_prob", "adv": "advantages", "rollout": "rollout_log_prob"}.get(tensor, tensor)
    with pytest.raises(NonFiniteInputError, match=rf"^{name}: 1 NaN/inf value\(s\).*row 2, column 0"):
        run("kpo", **inputs)


def test_token_corrections_weight_every_token():
    log_prob, old, adv, mask, rollout = batch(noise=0.2)
    tis = TruncatedISConfig(threshold=1.02)
    loss, _, metrics = run("ppo", log_prob, old, adv, mask, rollout, loss_agg_mode="token-mean",
                           corrections=CorrectionsConfig(tis=tis, icepop=IcePopConfig(low=0.95, high=1.05)))
    ratio, w = (log_prob - old).exp(), (old - rollout).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -3 * adv), per_token)
    weight = w.clamp(max=1.02) * torch.where((w >= 0.95) & (w <= 1.05), w, 0.0)
    assert loss.item() == pytest.approx(masked_token_mean(per_token * weight, mask).item(), rel=1e-12)
    assert 0 < metrics["mismatch/icepop_keep_frac"].item() < 1


def test_sequence_corrections_and_composable_trm():
    log_prob, old, adv, mask, rollout = batch(noise=0.2)
    rollout[1, 0] = log_prob[1, 0] + 1.0  # trm rejects sequence 1
    corrections = CorrectionsConfig(mis=TruncatedISConfig(level="sequence", threshold=1.1),
                                    geo_mask=GeoMaskConfig(low=0.5, high=2.0), trm=TRMConfig())
    loss, _, metrics = run("gspo", log_prob, old, adv, mask, rollout, corrections=corrections,
                           gspo=GSPOConfig(eps_low=0.9, eps_high=9.0))
    n = mask.sum(-1)
    s = (((log_prob - old) * mask).sum(-1) / n).exp()
    big_w = ((old - rollout) * mask).sum(-1).exp()
    weight = torch.where(big_w <= 1.1, big_w, 0.0) * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    assert loss.item() == pytest.approx((-adv[:, 0] * s * weight).mean().item(), rel=1e-12)
    assert metrics["trm_mask/accept_rate"].item() == pytest.approx(0.75)


def test_configuration_errors_are_named():
    log_prob, old, adv, mask, _ = batch()
    with pytest.raises(ValueError, match="unknown policy loss 'ppo2'; expected one of cispo, dapo"):
        compute_policy_loss("ppo2", log_prob, old, adv, mask)
    tis = PolicyLossConfig(corrections=CorrectionsConfig(tis=TruncatedISConfig()))
    with pytest.raises(ValueError, match="need rollout_log_prob"):
        compute_policy_loss("ppo", log_prob, old, adv, mask, config=tis)
    with pytest.raises(ValueError, match="'gmpo' is sequence-level"):
        compute_policy_loss("gmpo", log_prob, old, adv, mask, rollout_log_prob=old, config=tis)
    with pytest.raises(ValueError, match="'trm' has a fixed aggregation"):
        compute_policy_loss("trm", log_prob, old, adv, mask, config=PolicyLossConfig(loss_agg_mode="token-mean"))
    with pytest.raises(TypeError, match=r"wrap the process group: ContextParallelGroup\(group\)"):
        compute_policy_loss("ppo", log_prob, old, adv, mask, cp_group=object())
    with pytest.raises(ValueError, match=r"advantages has shape \(4, 5\), expected \(4, 6\)"):
        compute_policy_loss("ppo", log_prob, old, adv[:, :5], mask)


def test_float32_inputs_stay_float32():
    log_prob, old, adv, mask = (t.float() for t in batch()[:4])
    loss, metrics = compute_policy_loss("kpo", log_prob, old, adv, mask)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


@pytest.mark.parametrize("name, mode", [(name, None) for name in sorted(POLICY_LOSSES)]
                         + [(name, "seq-mean-token-sum-norm") for name in ("ppo", "kpo", "vespo")])
def test_prompt_plus_response_layout_equals_the_response_alone(name, mode):
    """Columns [prompt (P, masked) | response]: with response_start = P the loss, its gradient
    and its metrics equal those on the response tensor alone (KPO's positions included)."""
    log_prob, old, adv, mask, rollout = batch(noise=0.3)
    prompt = 5

    def with_prompt(t, fill=0.0):
        return torch.cat([torch.full((t.shape[0], prompt), fill, dtype=t.dtype), t], dim=1)

    config = PolicyLossConfig(loss_agg_mode=mode, kpo=KPOConfig(q=1e-2))
    lp_response = log_prob.clone().requires_grad_()
    expected, expected_metrics = compute_policy_loss(name, lp_response, old, adv, mask,
                                                     rollout_log_prob=rollout, config=config)
    (expected_grad,) = torch.autograd.grad(expected, lp_response)
    lp_full = with_prompt(log_prob, float("nan")).requires_grad_()
    loss, metrics = compute_policy_loss(
        name, lp_full, with_prompt(old), with_prompt(adv), with_prompt(mask), rollout_log_prob=with_prompt(rollout),
        config=config, cp_group=WholeSequences(response_start=prompt))
    (grad,) = torch.autograd.grad(loss, lp_full)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(grad[:, prompt:], expected_grad, atol=1e-14) and grad[:, :prompt].abs().max() == 0
    for key, value in expected_metrics.items():
        if key != "input/nonfinite_padding":
            assert metrics[key].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("name", ["kpo", "vespo", "trm", "ppo"])
def test_per_row_response_starts(name):
    """Rows [prompt_i | response_i | padding] with different prompt lengths (response_start a
    [B] tensor) give the loss of the right-aligned response tensor, KPO positions included."""
    log_prob, old, adv, mask, rollout = batch(noise=0.3)
    starts = torch.tensor([0, 3, 1, 2])
    width = log_prob.shape[1] + 3

    def shifted(t):
        out = torch.zeros(t.shape[0], width, dtype=t.dtype)
        for row, start in enumerate(starts.tolist()):
            out[row, start:start + t.shape[1]] = t[row]
        return out

    config = PolicyLossConfig(kpo=KPOConfig(q=1e-2))
    expected, _ = compute_policy_loss(name, log_prob, old, adv, mask, rollout_log_prob=rollout, config=config)
    loss, _ = compute_policy_loss(name, shifted(log_prob), shifted(old), shifted(adv), shifted(mask),
                                  rollout_log_prob=shifted(rollout), config=config,
                                  cp_group=WholeSequences(response_start=starts))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name, mode", [(name, None) for name in sorted(POLICY_LOSSES)]
                         + [("ppo", mode) for mode in ("seq-mean-token-mean", "seq-mean-token-sum",
                                                         "seq-mean-token-sum-norm")])
def test_micro_batches_with_step_counts_add_up_to_the_whole_batch(name, mode):
    log_prob, old, adv, mask, rollout = batch(noise=0.3, lengths=[6, 4, 1, 5, 0, 3], adv=[1, -0.5, 2, -1.5, 1, 0.3])
    config = PolicyLossConfig(loss_agg_mode=mode, kpo=KPOConfig(q=1e-2))
    whole, whole_grad, _ = run(name, log_prob, old, adv, mask, rollout, **config.__dict__)
    counts = GlobalCounts(tokens=mask.sum().item(), sequences=(mask.sum(-1) > 0).sum().item())
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        lp = log_prob[rows].clone().requires_grad_()
        loss, _ = compute_policy_loss(name, lp, old[rows], adv[rows], mask[rows], rollout_log_prob=rollout[rows],
                                      config=config, step_counts=counts)
        grads.append(torch.autograd.grad(loss, lp)[0])
        total += loss.item()
    assert total == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(torch.cat(grads), whole_grad, atol=1e-14)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_metrics_of_micro_batches_combine_into_the_metrics_of_the_batch(name):
    """Every metric declares how it combines; combining the micro-batches' metrics by those
    declarations gives the whole batch's metrics (means, extremes, sums and derived ones)."""
    log_prob, old, adv, mask, rollout = batch(noise=0.3, lengths=[6, 4, 1, 5, 0, 3], adv=[1, -0.5, 2, -1.5, 1, 0.3])
    config = PolicyLossConfig(kpo=KPOConfig(q=1e-2), trm=TRMConfig(max_k2=0.1), corrections=CorrectionsConfig(
        tis=TruncatedISConfig(level="sequence"), geo_mask=GeoMaskConfig(low=0.99, high=1.01)))
    _, whole = compute_policy_loss(name, log_prob, old, adv, mask, rollout_log_prob=rollout, config=config)
    parts = []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        _, metrics = compute_policy_loss(name, log_prob[rows], old[rows], adv[rows], mask[rows],
                                         rollout_log_prob=rollout[rows], config=config)
        parts.append(accumulate(metrics, mask[rows].sum().item(), (mask[rows].sum(-1) > 0).sum().item()))
    combined = finalize(combine(parts))
    assert set(whole) == set(whole.reductions)
    for key, value in ((key, value.item()) for key, value in whole.items()):
        assert combined[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

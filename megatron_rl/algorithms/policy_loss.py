"""The policy-loss registry: one entry per method, exactly as ALGORITHMS.md specifies.

Notation: z_t = clamp(log pi_theta - log pi_old, +-20) (gradient through log pi_theta),
r_t = exp(z_t), A the advantage (broadcast per token), m the response mask, sg = detach.

| name       | per-token l_t / per-sequence l_i                              | aggregation          |
|------------|---------------------------------------------------------------|----------------------|
| ppo        | max(-A r, -A clip(r, 1-el, 1+eh)); A<0: min(., -A c)          | token-mean           |
| dapo       | ppo with clip-higher (0.2, 0.28)                              | token-mean           |
| gspo       | l_i = max(-A s_i, -A clip(s_i)), s_i = exp(mean_t z)          | mean over sequences  |
| gspo_token | ppo-clip on s_it = exp(log pi - sg log pi + sg log s_i)       | seq-mean-token-mean  |
| gmpo       | l_i = -A_i exp(mean_t z^), z^ clipped in log space, pessimist | mean over sequences  |
| cispo      | -sg(clip(r, 1-el, 1+eh)) A log pi                             | token-mean           |
| sapo       | -A sigmoid(tau (r-1)) 4/tau, tau by sign(A)                   | seq-mean-token-mean  |
| kpo        | ppo-clip (no dual-clip) on exp(log pi - sg log pi + x^_t)     | seq-mean-token-mean  |
| vespo      | -phi(W_i) A log pi, log W_i = clamp(sum_t z, +-20)            | token-mean           |
| trm        | -M_i A rho_t, rho = exp(log pi - sg log mu), M_i the TRM mask | token sum / N seqs   |

The aggregation column is hyperparams.DEFAULT_AGGREGATION; gspo, gspo_token, gmpo and trm
accept no other (FIXED_AGGREGATION).

Where the papers' released code differs, these follow ALGORITHMS.md: KPO uses the exact gain
recursion and an associative scan (the release's float32 closed form is ~2.4 % off and its
cumsum state breaks for large q T; `kpo.released_gains` reproduces its gains); TRM divides by
the total number of sequences N (paper), not by accepted tokens (verl's decoupled mode).
Every log-ratio, KPO's observations included, is clamped to +-max_log_ratio (20) first.

Each loss returns its metrics with the reductions that combine them over micro-batches and ranks
(`metrics`); the diagnostics beyond clip fractions and ratios (entropy, KPO's switch frequency
and variances, VESPO's phi quantiles, TRM's rejection by length) are defined in `diagnostics`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_rl.algorithms.aggregation import GlobalCounts, aggregate, sequence_mean
from megatron_rl.algorithms.corrections import mismatch_correction
from megatron_rl.algorithms.diagnostics import PHI_QUANTILES, entropy_metrics, kpo_metrics, rejection_by_length
from megatron_rl.algorithms.hyperparams import (
    DEFAULT_AGGREGATION,
    FIXED_AGGREGATION,
    SEQUENCE_LEVEL_LOSSES,
    PolicyLossConfig,
    TRMConfig,
    token_level_corrections,
)
from megatron_rl.algorithms.kalman import kalman_filter
from megatron_rl.algorithms.kl import kl_k1, kl_k3
from megatron_rl.algorithms.loss_inputs import LossInputs, prepare_loss_inputs
from megatron_rl.algorithms.metrics import Metrics
from megatron_rl.algorithms.sequence_ops import WHOLE_SEQUENCES, WholeSequences
from megatron_rl.algorithms.trm import trm_mask, trm_sequence_stats
from megatron_rl.algorithms.vespo import vespo_phi


@dataclass
class LossOutput:
    """A loss's result before aggregation: exactly one of per_token / per_seq is set."""

    per_token: torch.Tensor | None = None  # [B, T_local]
    per_seq: torch.Tensor | None = None  # [B], already global (same value on every CP rank)
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class PolicyLoss:
    fn: Callable[[LossInputs, object], LossOutput]
    params: Callable[[PolicyLossConfig], object]  # the loss's section of the config


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register(name: str, params: Callable[[PolicyLossConfig], object]):
    """Add fn under name; its aggregation is hyperparams.DEFAULT_AGGREGATION[name]."""

    def wrap(fn):
        POLICY_LOSSES[name] = PolicyLoss(fn, params)
        return fn

    return wrap


def clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip_c=None):
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), then min(., -A c) where A < 0.

    Returns (loss, clipped, dual_clipped); the booleans mark tokens whose gradient the clip
    (resp. the dual clip) zeroes.
    """
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip_c is None:
        return loss, clip_active, torch.zeros_like(clip_active)
    bound = -adv * dual_clip_c
    dual_active = (adv < 0) & (loss > bound)
    return torch.where(dual_active, bound, loss), clip_active, dual_active


def _clip_metrics(x: LossInputs, clipped, dual=None) -> Metrics:
    metrics = Metrics().add("token", {"policy/clip_frac": x.ops.mean(clipped.to(x.mask.dtype), x.mask)})
    if dual is not None:
        metrics.add("token", {"policy/dual_clip_frac": x.ops.mean(dual.to(x.mask.dtype), x.mask)})
    return metrics


@register("ppo", lambda c: c.ppo)
@register("dapo", lambda c: c.dapo)
def ppo_loss(x: LossInputs, p) -> LossOutput:
    loss, clipped, dual = clipped_surrogate(x.log_ratio.exp(), x.advantages, p.eps_low, p.eps_high,
                                            p.dual_clip_c)
    return LossOutput(per_token=loss, metrics=_clip_metrics(x, clipped, dual))


def _mean_log_ratio(x: LossInputs, log_ratio) -> torch.Tensor:
    """[B] (1/|y_i|) sum_t m z: the log of the geometric-mean ratio (global under CP)."""
    return x.ops.seq_sum(log_ratio * x.mask) / x.counts.clamp(min=1)


@register("gspo", lambda c: c.gspo)
def gspo_loss(x: LossInputs, p) -> LossOutput:
    seq_ratio = _mean_log_ratio(x, x.log_ratio).exp()
    loss, clipped, _ = clipped_surrogate(seq_ratio, x.seq_advantage, p.eps_low, p.eps_high)
    nonempty = (x.counts > 0).to(seq_ratio.dtype)
    return LossOutput(per_seq=loss, metrics=Metrics().add("sequence", {
        "policy/clip_frac": (clipped * nonempty).sum() / nonempty.sum().clamp(min=1),
        "gspo/seq_ratio_mean": sequence_mean(seq_ratio, x.counts),
    }))


def _detached_value_ratio(x: LossInputs, log_value: torch.Tensor) -> torch.Tensor:
    """exp(log pi - sg log pi + log_value), log clamped at 10: value exp(log_value), grad value * dlog pi."""
    return (x.log_prob - x.log_prob.detach() + log_value.detach()).clamp(max=10.0).exp()


@register("gspo_token", lambda c: c.gspo)
def gspo_token_loss(x: LossInputs, p) -> LossOutput:
    ratio = _detached_value_ratio(x, _mean_log_ratio(x, x.log_ratio)[:, None])
    loss, clipped, _ = clipped_surrogate(ratio, x.advantages, p.eps_low, p.eps_high)
    return LossOutput(per_token=loss, metrics=_clip_metrics(x, clipped))


@register("gmpo", lambda c: c.gmpo)
def gmpo_loss(x: LossInputs, p) -> LossOutput:
    sign = torch.sign(x.advantages)
    z = x.log_ratio
    z_hat = sign * torch.minimum(sign * z, sign * z.clamp(-p.eps_low, p.eps_high))
    seq_ratio = _mean_log_ratio(x, z_hat).exp()
    clipped = (z_hat != z).to(x.mask.dtype)
    metrics = Metrics().add("token", {"policy/clip_frac": x.ops.mean(clipped, x.mask)})
    metrics.add("sequence", {"gmpo/seq_ratio_mean": sequence_mean(seq_ratio, x.counts)})
    return LossOutput(per_seq=-x.seq_advantage * seq_ratio, metrics=metrics)


@register("cispo", lambda c: c.cispo)
def cispo_loss(x: LossInputs, p) -> LossOutput:
    ratio = x.log_ratio.detach().exp()
    low = 1.0 - p.eps_low if p.eps_low is not None else 0.0
    weight = ratio.clamp(low, 1.0 + p.eps_high)
    clipped = (weight != ratio).to(x.mask.dtype)
    return LossOutput(per_token=-weight * x.advantages * x.log_prob,
                      metrics=Metrics().add("token", {"policy/clip_frac": x.ops.mean(clipped, x.mask)}))


@register("sapo", lambda c: c.sapo)
def sapo_loss(x: LossInputs, p) -> LossOutput:
    tau = torch.where(x.advantages > 0, p.tau_pos, p.tau_neg).to(x.log_prob.dtype)
    gate = torch.sigmoid(tau * (x.log_ratio.exp() - 1.0)) * 4.0 / tau
    return LossOutput(per_token=-gate * x.advantages,
                      metrics=Metrics().add("token", {"sapo/gate_mean": x.ops.mean(gate, x.mask)}))


@register("kpo", lambda c: c.kpo)
def kpo_loss(x: LossInputs, p) -> LossOutput:
    x_hat = kalman_filter(x.log_ratio.detach(), x.mask, p.q, p.r, p.released_gains, ops=x.ops)
    ratio = _detached_value_ratio(x, x_hat)
    if p.clip:
        loss, clipped, _ = clipped_surrogate(ratio, x.advantages, p.eps_low, p.eps_high)
        metrics = _clip_metrics(x, clipped)
    else:
        loss, metrics = -x.advantages * ratio, Metrics()
    return LossOutput(per_token=loss, metrics=metrics.merge(kpo_metrics(x, x_hat)))


@register("vespo", lambda c: c.vespo)
def vespo_loss(x: LossInputs, p) -> LossOutput:
    log_w = x.ops.seq_sum(x.log_ratio.detach() * x.mask)
    if p.use_rollout_log_prob and x.rollout_log_prob is not None:
        log_w = log_w + x.ops.seq_sum(x.clamp_log_ratio(x.old_log_prob - x.rollout_log_prob) * x.mask)
    phi = vespo_phi(log_w, x.seq_advantage, p.pos, p.neg)
    nonempty = x.counts > 0
    phi_kept = phi[nonempty]
    metrics = Metrics().add("sequence", {
        "vespo/phi_mean": sequence_mean(phi, x.counts),
        "vespo/phi_sq_mean": sequence_mean(phi**2, x.counts),
        "vespo/log_w_mean": sequence_mean(log_w.clamp(-20, 20), x.counts),
    })
    if phi_kept.numel():
        metrics.add("min", {"vespo/phi_min": phi_kept.min()}).add("max", {"vespo/phi_max": phi_kept.max()})
    metrics.add_quantiles("vespo/phi", phi_kept, PHI_QUANTILES)
    return LossOutput(per_token=-phi[:, None] * x.advantages * x.log_prob, metrics=metrics)


def trm_keep(x: LossInputs, p: TRMConfig, prefix: str) -> tuple[torch.Tensor, Metrics]:
    """TRM's sequence mask on log rho = log pi_theta - log mu (detached), and its metrics.

    Besides the acceptance rate and the rejection rate by length (`diagnostics`), the accepted
    sequences' largest max_t k2, longest length, sum of sum_t k3 and count: from them
    `metrics.DERIVED` evaluates the paper's bounds for any union of batches (prefix/bound_*).
    """
    log_rho = x.clamp_log_ratio(x.log_prob.detach() - x.behaviour_log_prob)
    keep = trm_mask(log_rho, x.mask, max_k2=p.max_k2, avg_k3=p.avg_k3, ops=x.ops)
    stats = trm_sequence_stats(log_rho, x.mask, ops=x.ops)
    nonempty = x.counts > 0
    accepted = (keep & nonempty).to(x.mask.dtype)
    zero = accepted.new_zeros(())
    metrics = Metrics().add("sequence", {f"{prefix}/accept_rate": accepted.sum() / nonempty.sum().clamp(min=1)})
    metrics.merge(rejection_by_length(keep, x.counts, prefix))
    metrics.add("max", {f"{prefix}/accepted_max_k2": torch.maximum(zero, (stats["max_k2"] * accepted).max()),
                        f"{prefix}/accepted_max_length": torch.maximum(zero, (stats["length"] * accepted).max())})
    return keep, metrics.add("sum", {
        f"{prefix}/accepted_kl_seq_sum": (stats["mean_k3"] * stats["length"] * accepted).sum(),
        f"{prefix}/accepted_count": accepted.sum(),
    })


@register("trm", lambda c: c.trm)
def trm_loss(x: LossInputs, p) -> LossOutput:
    keep, metrics = trm_keep(x, p, "trm")
    rho = x.clamp_log_ratio(x.log_prob - x.behaviour_log_prob).exp()
    return LossOutput(per_token=-x.advantages * rho * keep[:, None].to(rho.dtype), metrics=metrics)


def _common_metrics(x: LossInputs) -> Metrics:
    z = x.log_ratio.detach()
    metrics = Metrics().add("token", {
        "policy/ratio_mean": x.ops.mean(z.exp(), x.mask),
        "kl/k1": x.ops.mean(kl_k1(z), x.mask),
        "kl/k3": x.ops.mean(kl_k3(z), x.mask),
    })
    metrics.add("max", {"policy/ratio_max": x.ops.max(z.exp(), x.mask)})
    metrics.add("min", {"policy/ratio_min": -x.ops.max(-z.exp(), x.mask)})
    metrics.add("sum", {"input/nonfinite_padding": x.nonfinite_padding})
    if x.rollout_log_prob is not None:
        mismatch = x.clamp_log_ratio(x.old_log_prob - x.rollout_log_prob)
        seq_gap = (x.ops.seq_sum(mismatch * x.mask) / x.counts.clamp(min=1)).abs()
        metrics.add("token", {"mismatch/k3": x.ops.mean(kl_k3(mismatch), x.mask)})
        metrics.add("sequence", {"mismatch/log_ppl_abs_diff": sequence_mean(seq_gap, x.counts)})
    return metrics


def _resolve_ops(cp_group) -> WholeSequences:
    if cp_group is None:
        return WHOLE_SEQUENCES
    if isinstance(cp_group, WholeSequences):
        return cp_group
    raise TypeError(
        "cp_group must be None or a megatron_rl.parallel.context_parallel.ContextParallelGroup "
        f"(wrap the process group: ContextParallelGroup(group)); got {type(cp_group).__name__}"
    )


def compute_policy_loss(
    name: str,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_log_prob: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    cp_group: WholeSequences | None = None,
    step_counts: GlobalCounts | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The policy loss `name` and its metrics (detached 0-dim tensors).

    Args:
        log_prob, old_log_prob, advantages, response_mask: [B, T_local] (see loss_inputs).
        rollout_log_prob: [B, T_local] sampler log-probs; needed by the mismatch corrections,
            and used as TRM's behaviour policy mu when given (else mu = pi_old).
        config: hyperparameters (PolicyLossConfig or the run config's `algorithm` section);
            None means the papers' defaults.
        cp_group: None when this rank holds whole sequences; a ContextParallelGroup when it
            holds a CP shard. The loss value is then the global one on every rank and its
            gradient covers this rank's tokens only (sum parameter gradients over CP).
        step_counts: when this batch is one micro-batch of a step, the step's response-token and
            sequence counts (over micro-batches and DP ranks): the losses of the micro-batches
            then add up to the loss of the step. None: normalise over this batch.
        entropy: [B, T_local] entropy of pi_theta per token, for the metric policy/entropy only.
    """
    config = config if config is not None else PolicyLossConfig()
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {', '.join(sorted(POLICY_LOSSES))}")
    spec = POLICY_LOSSES[name]
    corrections = config.corrections
    needs_rollout = any(v is not None for v in (corrections.tis, corrections.mis, corrections.icepop,
                                                 corrections.geo_mask))
    if needs_rollout and rollout_log_prob is None:
        raise ValueError("algorithm.corrections (tis / mis / icepop / geo_mask) need rollout_log_prob")
    if name in SEQUENCE_LEVEL_LOSSES and token_level_corrections(corrections):
        raise ValueError(f"loss {name!r} is sequence-level: token-level corrections "
                         f"({', '.join(token_level_corrections(corrections))}) do not apply; use level: sequence")
    if config.loss_agg_mode is not None and name in FIXED_AGGREGATION:
        raise ValueError(f"loss {name!r} has a fixed aggregation; loss_agg_mode must be unset, "
                         f"got {config.loss_agg_mode!r}")
    x = prepare_loss_inputs(log_prob, old_log_prob, advantages, response_mask, rollout_log_prob,
                            _resolve_ops(cp_group), config.max_log_ratio)
    out = spec.fn(x, spec.params(config))
    metrics = _common_metrics(x).merge(out.metrics)
    if entropy is not None:
        metrics.merge(entropy_metrics(x, entropy))
    token_w, seq_w = None, None
    if needs_rollout:
        log_w = x.clamp_log_ratio(x.old_log_prob - x.rollout_log_prob)
        correction = mismatch_correction(corrections, log_w, x.mask, x.ops)
        token_w, seq_w = correction.token_weights, correction.seq_weights
        metrics.merge(correction.metrics)
    if corrections.trm is not None:
        keep, trm_metrics = trm_keep(x, corrections.trm, "trm_mask")
        seq_w = keep.to(x.mask.dtype) if seq_w is None else seq_w * keep
        metrics.merge(trm_metrics)
    if out.per_token is not None:
        per_token = out.per_token
        if token_w is not None:
            per_token = per_token * token_w
        if seq_w is not None:
            per_token = per_token * seq_w[:, None]
        loss = aggregate(per_token, x.mask, config.loss_agg_mode or DEFAULT_AGGREGATION[name], x.ops,
                         config.loss_norm_const, step_counts)
    else:
        loss = sequence_mean(out.per_seq if seq_w is None else out.per_seq * seq_w, x.counts,
                             step_counts.sequences if step_counts is not None else None)
    return loss, metrics.with_derived()

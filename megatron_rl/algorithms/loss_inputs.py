"""Validated, sanitised inputs shared by every policy loss.

Shapes: every tensor is [B, T_local], response-aligned (column t = response token t, right
padding). On one rank T_local = T; under context parallelism it is this rank's zig-zag shard.

Policy on bad values: a non-finite value on a response token (mask 1) is an error, raised on
every CP rank alike (the count is reduced first, so no rank is left waiting in a collective).
Non-finite values on padding are replaced by 0 and counted (metric input/nonfinite_padding).
Log-ratios are clamped to +-max_log_ratio before any exp.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_rl.algorithms.sequence_ops import WholeSequences


class NonFiniteInputError(ValueError):
    """A loss input holds NaN or inf on a response token."""


@dataclass
class LossInputs:
    log_prob: torch.Tensor  # log pi_theta, carries the gradient; 0 on padding
    old_log_prob: torch.Tensor  # log pi_old, detached; 0 on padding
    rollout_log_prob: torch.Tensor | None  # log pi_roll, detached; 0 on padding
    advantages: torch.Tensor  # detached; 0 on padding
    mask: torch.Tensor  # 1.0 on response tokens, 0.0 on padding (dtype of log_prob)
    ops: WholeSequences
    max_log_ratio: float
    nonfinite_padding: torch.Tensor  # global count of non-finite inputs replaced on padding

    def clamp_log_ratio(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return log_ratio.clamp(-self.max_log_ratio, self.max_log_ratio)

    @cached_property
    def log_ratio(self) -> torch.Tensor:
        """z = clamp(log pi_theta - log pi_old), with gradient through log pi_theta."""
        return self.clamp_log_ratio(self.log_prob - self.old_log_prob)

    @cached_property
    def behaviour_log_prob(self) -> torch.Tensor:
        """log mu: the sampler's log-probs when given (pi_roll), else pi_old."""
        return self.rollout_log_prob if self.rollout_log_prob is not None else self.old_log_prob

    @cached_property
    def counts(self) -> torch.Tensor:
        """[B] response tokens per sequence (global under CP)."""
        return self.ops.seq_sum(self.mask)

    @cached_property
    def seq_advantage(self) -> torch.Tensor:
        """[B] the sequence's advantage: the mean over its tokens (the broadcast value)."""
        return self.ops.seq_sum(self.advantages * self.mask) / self.counts.clamp(min=1)


def prepare_loss_inputs(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_log_prob: torch.Tensor | None,
    ops: WholeSequences,
    max_log_ratio: float,
) -> LossInputs:
    """Check shapes and finiteness, zero the padding, and wrap everything in LossInputs."""
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages}
    if rollout_log_prob is not None:
        named["rollout_log_prob"] = rollout_log_prob
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, T], got shape {tuple(log_prob.shape)}")
    for name, tensor in [*named.items(), ("response_mask", response_mask)]:
        if tensor.shape != log_prob.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(log_prob.shape)}")
    valid = response_mask.bool()
    bad_valid = [(~torch.isfinite(t.detach()) & valid) for t in named.values()]
    bad_padding = [(~torch.isfinite(t.detach()) & ~valid).sum() for t in named.values()]
    counts = ops.total(torch.stack([b.sum() for b in bad_valid] + bad_padding).to(torch.float64))
    for (name, _), bad, count in zip(named.items(), bad_valid, counts[: len(named)].tolist(), strict=True):
        if count > 0:
            where = "on another context-parallel rank"
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                where = f"first at row {row}, column {col} of this rank's tokens"
            raise NonFiniteInputError(
                f"{name}: {int(count)} NaN/inf value(s) on response tokens ({where}); "
                "the loss would be NaN, refusing to compute it"
            )
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    clean = {name: torch.where(valid, t, zero) for name, t in named.items()}
    return LossInputs(
        log_prob=clean["log_prob"],
        old_log_prob=clean["old_log_prob"].detach(),
        rollout_log_prob=clean["rollout_log_prob"].detach() if rollout_log_prob is not None else None,
        advantages=clean["advantages"].detach(),
        mask=valid.to(log_prob.dtype),
        ops=ops,
        max_log_ratio=max_log_ratio,
        nonfinite_padding=counts[len(named):].sum(),
    )

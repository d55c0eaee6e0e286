"""Loss aggregation modes (ALGORITHMS.md section 0), exact under context parallelism.

With m the response mask, l the per-token loss and N_seq the number of sequences that have at
least one response token:
- token-mean:              sum_{i,t} m l / sum_{i,t} m                       (DAPO, verl default)
- seq-mean-token-mean:     (1/N_seq) sum_i [sum_t m l / sum_t m]             (GRPO / GSPO)
- seq-mean-token-sum:      (1/N_seq) sum_i sum_t m l                         (TRM's divide-by-N)
- seq-mean-token-sum-norm: sum_{i,t} m l / const, const = max response length (Dr.GRPO)
Sequence-level losses l_i [B] are averaged over the N_seq non-empty sequences.

When the batch is one micro-batch of a step (several micro-batches, several DP ranks), pass the
step's `GlobalCounts`: the denominators become the step's token and sequence counts, so the
micro-batch losses add up exactly to the loss of the whole step.
"""

from dataclasses import dataclass

import torch

from megatron_rl.algorithms.sequence_ops import WholeSequences


@dataclass(frozen=True)
class GlobalCounts:
    """Response tokens and non-empty sequences of the whole step (all micro-batches, DP ranks)."""

    tokens: float
    sequences: float


def sequence_mean(per_seq: torch.Tensor, counts: torch.Tensor, num_sequences: float | None = None) -> torch.Tensor:
    """Sum of per_seq [B] over sequences with a positive token count [B], over their number
    (or over num_sequences, the step's count)."""
    nonempty = counts > 0
    kept = torch.where(nonempty, per_seq, torch.zeros_like(per_seq))
    return kept.sum() / (num_sequences if num_sequences is not None else nonempty.sum().clamp(min=1))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    ops: WholeSequences,
    norm_const: float | None = None,
    step_counts: GlobalCounts | None = None,
) -> torch.Tensor:
    """Scalar loss from per_token [B, T_local] and mask [B, T_local] (float) by mode."""
    masked = per_token * mask
    num_sequences = step_counts.sequences if step_counts is not None else None
    if mode == "token-mean":
        tokens = step_counts.tokens if step_counts is not None else ops.total(mask.sum()).clamp(min=1)
        return ops.total(masked.sum()) / tokens
    if mode == "seq-mean-token-sum-norm":
        const = norm_const if norm_const is not None else ops.response_length(mask.shape[-1])
        return ops.total(masked.sum()) / const
    counts = ops.seq_sum(mask)
    seq_sums = ops.seq_sum(masked)
    if mode == "seq-mean-token-mean":
        return sequence_mean(seq_sums / counts.clamp(min=1), counts, num_sequences)
    if mode == "seq-mean-token-sum":
        return sequence_mean(seq_sums, counts, num_sequences)
    raise ValueError(
        f"unknown loss_agg_mode {mode!r}; expected one of token-mean, seq-mean-token-mean, "
        "seq-mean-token-sum, seq-mean-token-sum-norm"
    )

"""Reductions along the token axis, as seen by one rank.

Every loss is written against this small interface, never against `x.sum(-1)` directly, so the
same code is exact whether a rank holds whole sequences (`WholeSequences`, here) or a
context-parallel shard of each (`megatron_rl.parallel.context_parallel.ContextParallelGroup`).

Shapes: token tensors are [B, T_local]; T_local = T on one rank. Columns are positions in the
sequence: either the response alone (response_start = 0) or prompt + response, the response of
row i starting at column response_start[i] (an int shared by every row, or a [B] tensor: the
learner's rows are [prompt | response | padding]); the mask selects response tokens.
Reductions return [B] (per sequence) or the input's shape (`total`).

Gradient contract (what makes CP exact): a reduction's *value* is the global one; its *gradient*
flows only into this rank's tokens. A loss built from these reductions therefore has the same
value on every rank as on one rank holding everything, and its gradient w.r.t. the local
log-probs is the matching slice of the single-rank gradient. Parameter gradients are summed
over the CP group (Megatron's DP x CP gradient all-reduce does this).
"""

import torch

from megatron_rl.algorithms.scan import affine_scan


class WholeSequences:
    """Single-rank reductions: this rank holds every token of every sequence."""

    def __init__(self, response_start: int | torch.Tensor = 0):
        if (torch.as_tensor(response_start) < 0).any():
            raise ValueError(f"response_start must be >= 0, got {response_start}")
        self.response_start = response_start

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B]: sum over tokens (mask x first)."""
        return x.sum(dim=-1)

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B]: max over tokens, detached (fill masked tokens with -inf first)."""
        return x.detach().amax(dim=-1)

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank partial results (identity here); any shape."""
        return x

    def total_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max of per-rank partial results (identity here), detached."""
        return x.detach()

    def mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over every token of the batch (0 when the mask is empty)."""
        return self.total((x * mask).sum()) / self.total(mask.sum()).clamp(min=1)

    def max(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked max over every token of the batch, detached (-inf when the mask is empty)."""
        return self.total_max(torch.where(mask.bool(), x.detach(), float("-inf")).amax())

    def previous_column(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T_local] -> same shape: at each local column, x at the previous column of the
        whole sequence (0 at the first column), detached."""
        return torch.nn.functional.pad(x.detach()[..., :-1], (1, 0))

    def global_columns(self, t_local: int, device: torch.device | None = None) -> torch.Tensor:
        """[T_local] int64: the 0-based column in the whole sequence of each local column."""
        return torch.arange(t_local, device=device)

    def sequence_length(self, t_local: int) -> int:
        """The padded length of the whole sequences."""
        return t_local

    def positions(self, t_local: int, device: torch.device | None = None) -> torch.Tensor:
        """The 1-based position in the response of each local column (<= 0 before it).

        [T_local] int64 for a shared response_start, [B, T_local] for a per-row one.
        """
        columns = self.global_columns(t_local, device) + 1
        if isinstance(self.response_start, torch.Tensor):
            return columns[None, :] - self.response_start.to(columns.device)[:, None]
        return columns - self.response_start

    def response_length(self, t_local: int) -> int:
        """The longest response the padded sequences can hold."""
        return self.sequence_length(t_local) - int(torch.as_tensor(self.response_start).min())

    def affine_scan(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_{t-1} + b_t along the sequence, x_0 = 0. a: [T] or [B, T]; b: [B, T]."""
        return affine_scan(a, b)[1]


WHOLE_SEQUENCES = WholeSequences()

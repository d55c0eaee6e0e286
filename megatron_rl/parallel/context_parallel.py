"""Context parallelism: Megatron's zig-zag layout, and exact cross-rank sequence reductions.

Layout (Megatron's load-balanced CP): the token axis of every sequence is cut into 2*cp equal
chunks; CP rank r holds chunks r and 2*cp-1-r, concatenated in that order. Causal attention
work is then balanced across ranks.

`ContextParallelGroup` implements the `SequenceOps` interface of `megatron_rl.algorithms` over
a process group, so every loss in the registry runs unchanged on a CP shard:
- seq_sum / total: local partial sums, all-reduced SUM; value global, gradient local.
- seq_max / total_max: all-reduce MAX (detached): TRM's max criterion.
- previous_column (adjacent-token pairs, e.g. KPO's sign switches): a shift by one column
  within each local chunk; a chunk's first column takes the last column of the chunk before it
  in sequence order, from one all-gather of 2 columns per rank (O(B * cp) values), so every
  pair that straddles a chunk boundary is seen exactly once, by the rank of its later token.
- affine_scan (the KPO filter): each local chunk is scanned from x = 0, giving its carry
  (A_c, B_c) = (prod a, x_end); one all-gather of 2 carries per rank and sequence
  (O(B * cp) floats, not O(T)); the exclusive prefix over chunks in sequence order gives each
  chunk's incoming state x_in, and x_t = x~_t + A~_t x_in.
"""

import torch
import torch.distributed as dist

from megatron_rl.algorithms.scan import affine_scan
from megatron_rl.algorithms.sequence_ops import WholeSequences


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices CP rank cp_rank holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_for_context_parallel(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = -1) -> torch.Tensor:
    """This rank's shard of x along dim (its length must be divisible by 2 * cp_size)."""
    if cp_size == 1:
        return x
    if x.shape[dim] % (2 * cp_size):
        raise ValueError(f"length {x.shape[dim]} along dim {dim} is not divisible by 2 * cp = {2 * cp_size}; "
                         "pad sequences to a multiple of 2 * cp")
    chunks = x.chunk(2 * cp_size, dim=dim)
    first, second = zigzag_chunks(cp_rank, cp_size)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def gather_from_context_parallel(x_local: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Inverse of split_for_context_parallel: the whole tensor on every rank (no gradient)."""
    cp_size = dist.get_world_size(group)
    if cp_size == 1:
        return x_local
    shards = [torch.empty_like(x_local) for _ in range(cp_size)]
    dist.all_gather(shards, x_local.detach().contiguous(), group=group)
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = zigzag_chunks(rank, cp_size)
        chunks[first], chunks[second] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def sequence_ops(group, response_start: int | torch.Tensor = 0) -> WholeSequences:
    """The SequenceOps of a CP group: ContextParallelGroup, or WholeSequences when cp = 1."""
    if dist.get_world_size(group) == 1:
        return WholeSequences(response_start)
    return ContextParallelGroup(group, response_start)


class ContextParallelGroup(WholeSequences):
    """Sequence reductions over a CP process group, for [B, T_local] zig-zag shards."""

    def __init__(self, group=None, response_start: int = 0):
        super().__init__(response_start)
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _all_reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=op, group=self.group)
        return out

    def total(self, x: torch.Tensor) -> torch.Tensor:
        local = x.detach()
        return x + (self._all_reduce(local, dist.ReduceOp.SUM) - local)

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.total(x.sum(dim=-1))

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX)

    def total_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def _chunk_length(self, t_local: int) -> int:
        if t_local % 2:
            raise ValueError(f"a CP shard holds 2 equal chunks; its length {t_local} is odd")
        return t_local // 2

    def global_columns(self, t_local: int, device: torch.device | None = None) -> torch.Tensor:
        length = self._chunk_length(t_local)
        first, second = zigzag_chunks(self.rank, self.size)
        local = torch.arange(length, device=device)
        return torch.cat([local + first * length, local + second * length])

    def sequence_length(self, t_local: int) -> int:
        return t_local * self.size

    def previous_column(self, x: torch.Tensor) -> torch.Tensor:
        length = self._chunk_length(x.shape[-1])
        x = x.detach()
        halves = (x[..., :length], x[..., length:])
        last_columns = torch.stack([half[..., -1] for half in halves]).contiguous()  # [2, ...]
        gathered = [torch.empty_like(last_columns) for _ in range(self.size)]
        dist.all_gather(gathered, last_columns, group=self.group)
        last_of_chunk = {chunk: gathered[rank][local_index] for rank in range(self.size)
                         for local_index, chunk in enumerate(zigzag_chunks(rank, self.size))}
        shifted = []
        for half, chunk in zip(halves, zigzag_chunks(self.rank, self.size), strict=True):
            before = last_of_chunk[chunk - 1] if chunk > 0 else torch.zeros_like(half[..., -1])
            shifted.append(torch.cat([before[..., None], half[..., :-1]], dim=-1))
        return torch.cat(shifted, dim=-1)

    def affine_scan(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_{t-1} + b_t over the whole sequence; a: [T_local] or [B, T_local]. No grad."""
        length = self._chunk_length(b.shape[-1])
        a, b = a.detach(), b.detach()
        halves = [slice(0, length), slice(length, 2 * length)]
        prods, xs = zip(*(affine_scan(a[..., half], b[..., half]) for half in halves), strict=True)
        # carries[rank][local chunk] = (A_c, B_c), each [B]
        carries = torch.stack([torch.stack([p[..., -1].expand_as(x[..., -1]), x[..., -1]]) for p, x in
                               zip(prods, xs, strict=True)])
        gathered = [torch.empty_like(carries) for _ in range(self.size)]
        dist.all_gather(gathered, carries.contiguous(), group=self.group)
        by_chunk = {}
        for rank, rank_carries in enumerate(gathered):
            for local_index, chunk in enumerate(zigzag_chunks(rank, self.size)):
                by_chunk[chunk] = rank_carries[local_index]
        incoming = {}
        state = torch.zeros_like(xs[0][..., -1])
        for chunk in range(2 * self.size):
            incoming[chunk] = state
            chunk_prod, chunk_x = by_chunk[chunk]
            state = chunk_prod * state + chunk_x
        local_chunks = zigzag_chunks(self.rank, self.size)
        return torch.cat([x + p * incoming[chunk][..., None]
                          for p, x, chunk in zip(prods, xs, local_chunks, strict=True)], dim=-1)

"""The THD layout of one packed row: n sequences back to back, then padding.

Segment k of the row occupies columns [cu_seqlens[k], cu_seqlens[k+1]); the first n segments are
sequences, and when the row is longer than their total (S a multiple of the padding multiple) one
last segment holds the padding, so cu_seqlens[-1] = S always. Attention stays inside a segment
(block-diagonal causal) and RoPE positions restart at 0 in every segment: each sequence is
computed exactly as if it were alone in a row. This is the format Megatron-Core's
PackedSeqParams(qkv_format="thd") describes with cu_seqlens_q = cu_seqlens_kv = cu_seqlens.

`pack` / `unpack` map between the packed row [1, S] and the per-sequence layout [n, T] (row i =
sequence i from column 0, T its longest length, zeros after each sequence's end).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSequences:
    """Where the sequences of one packed row are; see the module docstring."""

    cu_seqlens: torch.Tensor  # [segments + 1] int32: 0, end of segment 0, ..., S
    num_sequences: int  # n: segments past the first n are padding

    @classmethod
    def of_lengths(cls, lengths: Sequence[int], width: int) -> "PackedSequences":
        """n sequences of `lengths` packed into a row of `width` >= sum(lengths) columns."""
        total = sum(lengths)
        if width < total or min(lengths, default=0) <= 0:
            raise ValueError(f"cannot pack sequences of lengths {list(lengths)} into a row of {width} columns")
        ends = [*torch.tensor(lengths).cumsum(0).tolist(), *([width] if width > total else [])]
        return cls(torch.tensor([0, *ends], dtype=torch.int32), len(lengths))

    @property
    def width(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def segment_lengths(self) -> torch.Tensor:
        """[segments] int64: sequence lengths, then the padding's (if any)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def max_segment_length(self) -> int:
        """The longest segment, padding included (RoPE needs positions 0 .. this - 1)."""
        return int(self.segment_lengths.max())

    def positions(self) -> torch.Tensor:
        """[S] int64: each column's position in its own segment."""
        starts = self.cu_seqlens[:-1].long().repeat_interleave(self.segment_lengths)
        return torch.arange(self.width, device=starts.device) - starts

    def widened(self, width: int) -> "PackedSequences":
        """The same sequences in a row of `width` >= S columns (more padding at the end)."""
        lengths = self.segment_lengths[:self.num_sequences].tolist()
        return PackedSequences.of_lengths(lengths, width)

    def _columns(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, T] packed column of sequence i's column j, clamped to the row; [n, T] bool: j < length_i)."""
        lengths = self.segment_lengths[:self.num_sequences].to(device)
        offsets = torch.arange(int(lengths.max()), device=device)
        columns = self.cu_seqlens[:self.num_sequences].to(device).long()[:, None] + offsets
        return columns.clamp(max=self.width - 1), offsets[None, :] < lengths[:, None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, S] packed -> [n, T] per sequence (0 past each sequence's end); differentiable."""
        columns, valid = self._columns(x.device)
        return torch.where(valid, x[0, columns], torch.zeros((), dtype=x.dtype, device=x.device))

    def pack(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[n, T'] per sequence (T' >= each length) -> [1, S], `fill` on the padding columns."""
        columns, valid = self._columns(x.device)
        out = torch.full((1, self.width), fill, dtype=x.dtype, device=x.device)
        out[0, columns[valid]] = x[:, :columns.shape[1]][valid]
        return out

    def to(self, device: torch.device) -> "PackedSequences":
        return PackedSequences(self.cu_seqlens.to(device), self.num_sequences)

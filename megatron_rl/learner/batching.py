"""From rollout samples to the learner's micro-batches.

Planning (pure Python, identical on every rank, so it needs no communication):
1. `partition_for_data_parallel`: the global batch is split over the DP ranks with equal sample
   counts and balanced token counts (longest sample first, to the lightest rank that still has
   room).
2. `plan_micro_batches`: every DP rank's samples are cut into the SAME number of micro-batches
   (MoE all-to-alls need every rank to run as many forward passes), the fewest that keep each
   micro-batch's padded size rows x S under the token budget. Samples are sorted by length, so
   rows of a micro-batch have similar lengths and padding stays small.

Layout of a micro-batch (`collate`): row i is [prompt_i | response_i | padding], S a multiple of
`pad_multiple` (2 cp tp under context parallelism, for the zig-zag split and sequence
parallelism). Labels are shifted per sequence BEFORE any CP split: labels[i, j] = tokens[i, j+1],
so column j predicts token j+1 and the response token k of row i is predicted at column
len(prompt_i) - 1 + k (= response_start[i] + k). Log-probs, advantages and the loss mask live on
those label columns.

Sequence packing (data.pack_sequences; cp == 1): `plan_packed_micro_batches` puts several samples
into one row whose packed length (padded to `pad_multiple` at the end only) stays under the token
budget, and `collate_packed` lays them out back to back (megatron_rl.learner.thd): a [1, S] row,
labels shifted per sequence, positions restarting at 0 in each, `packing` saying where each
sequence is. The per-sequence fields (response_start, sample_index) have one entry per sequence,
and `packing.unpack` turns any [1, S] token tensor into the [n, T] layout above (without the end
padding), which is what the loss sees.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_rl.learner.thd import PackedSequences


@dataclass(frozen=True)
class RolloutSample:
    """One response, as the learner trains on it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float
    rollout_log_probs: Sequence[float] | None = None  # one per response token (the sampler's)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Tensors of one micro-batch, [b, S] unless noted; label columns as in the module docstring.

    Packed (`packing` set): b = 1, and response_start / sample_index have one entry per sequence.
    """

    tokens: torch.Tensor  # int64
    position_ids: torch.Tensor  # int64, 0..S-1 on every row; packed: 0.. in every sequence
    labels: torch.Tensor  # int64, tokens shifted left by one; 0 where nothing is predicted
    loss_mask: torch.Tensor  # float32, 1 on columns that predict a response token
    advantages: torch.Tensor  # float32, the sample's advantage on its loss_mask, 0 elsewhere
    rollout_log_probs: torch.Tensor | None  # float32, the sampler's log-probs on the loss_mask
    response_start: torch.Tensor  # [b] int64, the column predicting the first response token
    sample_index: torch.Tensor  # [b] int64, position of each row in the global batch
    packing: PackedSequences | None = None  # where each sequence of the packed row is

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def per_sequence(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A [b, S] token tensor of this micro-batch in the one-row-per-sequence layout ([n, T] if packed)."""
        return x if x is None or self.packing is None else self.packing.unpack(x)

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(**{name: None if value is None else value.to(device) for name, value in vars(self).items()})


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def validate_samples(samples: Sequence[RolloutSample]) -> None:
    """ValueError naming the first malformed sample (index and what is wrong)."""
    for index, sample in enumerate(samples):
        if len(sample.prompt_ids) == 0 or len(sample.response_ids) == 0:
            raise ValueError(f"sample {index}: prompt and response must be non-empty, got "
                             f"{len(sample.prompt_ids)} prompt and {len(sample.response_ids)} response tokens")
        if sample.rollout_log_probs is not None and len(sample.rollout_log_probs) != len(sample.response_ids):
            raise ValueError(f"sample {index}: {len(sample.rollout_log_probs)} rollout log-probs for "
                             f"{len(sample.response_ids)} response tokens")
        if (sample.rollout_log_probs is None) != (samples[0].rollout_log_probs is None):
            raise ValueError(f"sample {index}: rollout log-probs must be given for every sample or for none")


def partition_for_data_parallel(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Sample indices per DP rank: equal counts, token sums balanced (longest-first greedy)."""
    if len(lengths) % dp_size:
        raise ValueError(f"{len(lengths)} samples cannot be split evenly over {dp_size} data-parallel ranks")
    per_rank = len(lengths) // dp_size
    parts: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0] * dp_size
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min((r for r in range(dp_size) if len(parts[r]) < per_rank), key=lambda r: (loads[r], r))
        parts[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(part) for part in parts]


def _cut(sorted_lengths: list[int], cap: int) -> list[int]:
    """Group sizes of the greedy cut of length-sorted rows into runs of padded cost <= cap."""
    sizes, rows, longest = [], 0, 0
    for length in sorted_lengths:
        if rows and (rows + 1) * max(longest, length) > cap:
            sizes.append(rows)
            rows, longest = 0, 0
        rows, longest = rows + 1, max(longest, length)
    return sizes + [rows]


def _cut_into(sorted_lengths: list[int], count: int) -> list[int]:
    """Exactly `count` (<= rows) runs of length-sorted rows, minimising the largest padded cost.

    A row longer than the cap still forms a run of its own, so caps below the longest row are
    meaningful for the others.
    """
    low, high = 1, len(sorted_lengths) * max(sorted_lengths)
    while low < high:  # the smallest cap whose greedy cut needs at most `count` runs
        cap = (low + high) // 2
        low, high = (low, cap) if len(_cut(sorted_lengths, cap)) <= count else (cap + 1, high)
    sizes = _cut(sorted_lengths, low)
    while len(sizes) < count:  # split the run with the most rows
        largest = max(range(len(sizes)), key=lambda i: sizes[i])
        sizes[largest:largest + 1] = [sizes[largest] // 2, sizes[largest] - sizes[largest] // 2]
    return sizes


def plan_micro_batches(
    lengths: Sequence[int], dp_size: int, max_tokens: int, pad_multiple: int = 1
) -> list[list[list[int]]]:
    """plan[dp_rank][micro_batch] = sample indices; every rank gets the same number of micro-batches.

    A micro-batch's cost is rows x S (S its padded length) and stays <= max_tokens, except a
    single sample longer than the budget, which then forms a micro-batch of its own.
    """
    padded = [padded_length(length, pad_multiple) for length in lengths]
    ranks = partition_for_data_parallel(padded, dp_size)
    by_length = [sorted(rank, key=lambda i: (padded[i], i)) for rank in ranks]
    count = max(len(_cut([padded[i] for i in rank], max_tokens)) for rank in by_length)
    plan = []
    for rank in by_length:
        sizes = _cut_into([padded[i] for i in rank], count)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        plan.append([rank[start:start + size] for start, size in zip(starts, sizes, strict=True)])
    return plan


def _pack_into(indices: list[int], lengths: Sequence[int], count: int, max_tokens: int,
               pad_multiple: int) -> list[list[int]] | None:
    """`count` rows of the samples `indices`, longest first, each to the lightest row it fits in
    (padded packed length <= max_tokens; an empty row takes any sample). None if one fits nowhere."""
    rows: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        fitting = [r for r in range(count)
                   if not rows[r] or padded_length(loads[r] + lengths[index], pad_multiple) <= max_tokens]
        if not fitting:
            return None
        row = min(fitting, key=lambda r: (loads[r], r))
        rows[row].append(index)
        loads[row] += lengths[index]
    return [sorted(row) for row in rows]


def _fewest_rows(lengths: Sequence[int], indices: list[int], max_tokens: int, pad_multiple: int) -> int:
    """A lower bound on the rows of the samples `indices`: one per sample over the budget (alone
    in its row), and enough rows of max_tokens for the others."""
    over = [i for i in indices if padded_length(lengths[i], pad_multiple) > max_tokens]
    rest = sum(lengths[i] for i in indices) - sum(lengths[i] for i in over)
    return max(1, len(over) + -(-rest // max_tokens))


def plan_packed_micro_batches(
    lengths: Sequence[int], dp_size: int, max_tokens: int, pad_multiple: int = 1
) -> list[list[list[int]]]:
    """plan[dp_rank][micro_batch] = sample indices packed into one row; the same count on every rank.

    A micro-batch's cost is its packed length padded to pad_multiple, <= max_tokens (a sample
    longer than the budget is packed alone). The count is the smallest for which every rank's
    samples fit (at most the samples per rank: one sample per row always fits); the rows of a rank
    get similar token counts (longest sample first, to the lightest row).
    """
    ranks = partition_for_data_parallel(lengths, dp_size)
    count = max(_fewest_rows(lengths, rank, max_tokens, pad_multiple) for rank in ranks)
    while True:
        plan = [_pack_into(rank, lengths, count, max_tokens, pad_multiple) for rank in ranks]
        if all(rows is not None for rows in plan):
            return plan
        count += 1


def collate(samples: Sequence[RolloutSample], indices: Sequence[int], pad_multiple: int = 1,
            pad_id: int = 0) -> MicroBatch:
    """The micro-batch of samples[indices] in the [prompt | response | padding] layout."""
    rows = [samples[i] for i in indices]
    width = padded_length(max(len(row) for row in rows), pad_multiple)
    shape = (len(rows), width)
    tokens = torch.full(shape, pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(shape)
    advantages = torch.zeros(shape)
    with_log_probs = rows[0].rollout_log_probs is not None
    rollout_log_probs = torch.zeros(shape) if with_log_probs else None
    starts = []
    for row, sample in enumerate(rows):
        prompt, response = len(sample.prompt_ids), len(sample.response_ids)
        tokens[row, :prompt + response] = torch.tensor([*sample.prompt_ids, *sample.response_ids])
        predicting = slice(prompt - 1, prompt - 1 + response)
        loss_mask[row, predicting] = 1.0
        advantages[row, predicting] = sample.advantage
        if with_log_probs:
            rollout_log_probs[row, predicting] = torch.tensor(sample.rollout_log_probs, dtype=torch.float32)
        starts.append(prompt - 1)
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    labels = torch.where(loss_mask.bool(), labels, torch.zeros_like(labels))
    return MicroBatch(
        tokens=tokens,
        position_ids=torch.arange(width).expand(shape).clone(),
        labels=labels,
        loss_mask=loss_mask,
        advantages=advantages,
        rollout_log_probs=rollout_log_probs,
        response_start=torch.tensor(starts),
        sample_index=torch.tensor(list(indices)),
    )


def collate_packed(samples: Sequence[RolloutSample], indices: Sequence[int], pad_multiple: int = 1,
                   pad_id: int = 0) -> MicroBatch:
    """The micro-batch of samples[indices] packed into one row [1, S] (S = total length padded to
    pad_multiple): `collate`'s rows, each cut at its length, back to back (labels therefore never
    cross a sequence end: a sequence's last column predicts nothing)."""
    rows = collate(samples, indices, pad_id=pad_id)
    lengths = [len(samples[i]) for i in indices]
    packing = PackedSequences.of_lengths(lengths, padded_length(sum(lengths), pad_multiple))
    return MicroBatch(
        tokens=packing.pack(rows.tokens, pad_id),
        position_ids=packing.positions()[None, :],
        labels=packing.pack(rows.labels),
        loss_mask=packing.pack(rows.loss_mask),
        advantages=packing.pack(rows.advantages),
        rollout_log_probs=None if rows.rollout_log_probs is None else packing.pack(rows.rollout_log_probs),
        response_start=rows.response_start,
        sample_index=rows.sample_index,
        packing=packing,
    )


def micro_batches_for_rank(samples: Sequence[RolloutSample], dp_size: int, dp_rank: int, max_tokens: int,
                           pad_multiple: int = 1, pack: bool = False) -> list[MicroBatch]:
    """Data-parallel rank dp_rank's micro-batches of samples: packed rows (pack) or padded rows."""
    lengths = [len(sample) for sample in samples]
    if pack:
        plan = plan_packed_micro_batches(lengths, dp_size, max_tokens, pad_multiple)
        return [collate_packed(samples, indices, pad_multiple) for indices in plan[dp_rank]]
    plan = plan_micro_batches(lengths, dp_size, max_tokens, pad_multiple)
    return [collate(samples, indices, pad_multiple) for indices in plan[dp_rank]]


def pad_to_shape(mb: MicroBatch, rows: int, width: int, pad_id: int = 0) -> MicroBatch:
    """mb grown to [rows, width] with empty rows (no response token) and padding columns.

    Pipeline schedules send activations of one fixed shape between stages: every micro-batch of
    a step is padded to the largest one. Empty rows count in no loss and no metric. A packed
    micro-batch stays one row: its padding segment grows.
    """
    b, s = mb.tokens.shape
    if rows < b or width < s or (mb.packing is not None and rows != 1):
        raise ValueError(f"cannot pad a [{b}, {s}] {'packed ' if mb.packing else ''}micro-batch to [{rows}, {width}]")
    packing = None if mb.packing is None else mb.packing.widened(width)

    def grow(t, fill):
        if t is None:
            return None
        out = torch.full((rows, width), fill, dtype=t.dtype)
        out[:b, :s] = t
        return out

    return MicroBatch(
        tokens=grow(mb.tokens, pad_id),
        position_ids=torch.arange(width).expand(rows, width).clone() if packing is None else packing.positions()[None],
        labels=grow(mb.labels, 0),
        loss_mask=grow(mb.loss_mask, 0.0),
        advantages=grow(mb.advantages, 0.0),
        rollout_log_probs=grow(mb.rollout_log_probs, 0.0),
        response_start=torch.cat([mb.response_start, torch.zeros(rows - b, dtype=torch.int64)]),
        sample_index=torch.cat([mb.sample_index, torch.full((rows - b,), -1, dtype=torch.int64)]),
        packing=packing,
    )

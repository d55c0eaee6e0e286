"""Sequence packing: the THD layout (megatron_rl.learner.thd), the packing plan and collate_packed."""

import pytest
import torch

from megatron_rl.config import ConfigError, config_from_dict
from megatron_rl.learner.batching import (
    RolloutSample,
    collate,
    collate_packed,
    micro_batches_for_rank,
    pad_to_shape,
    plan_packed_micro_batches,
)
from megatron_rl.learner.thd import PackedSequences


def sample(prompt, response, advantage=1.0):
    return RolloutSample(list(prompt), list(response), advantage, [-0.1 * (k + 1) for k in range(len(response))])


def test_collate_packed_lays_sequences_back_to_back():
    samples = [sample([11, 12, 13], [21, 22], 0.5), sample([31], [41, 42, 43, 44], -1.0), sample([51, 52], [61])]
    mb = collate_packed(samples, [0, 1, 2], pad_multiple=4)
    # lengths 5, 5, 3: 13 tokens, padded to 16 at the end; the padding is a segment of its own
    assert mb.packing.cu_seqlens.tolist() == [0, 5, 10, 13, 16] and mb.packing.num_sequences == 3
    assert mb.packing.cu_seqlens.dtype == torch.int32 and mb.packing.max_segment_length == 5
    assert mb.tokens.tolist() == [[11, 12, 13, 21, 22, 31, 41, 42, 43, 44, 51, 52, 61, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]]
    # column j predicts token j+1 of its own sequence; a sequence's last column predicts nothing
    assert mb.labels.tolist() == [[0, 0, 21, 22, 0, 41, 42, 43, 44, 0, 0, 61, 0, 0, 0, 0]]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5, 0, -1, -1, -1, -1, 0, 0, 1, 0, 0, 0, 0]]
    assert torch.allclose(mb.rollout_log_probs[0, 5:9], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert mb.response_start.tolist() == [2, 0, 1] and mb.sample_index.tolist() == [0, 1, 2]
    assert mb.num_response_tokens == 7


def test_unpacked_packed_micro_batch_is_the_padded_one():
    """The loss sees packed tensors unpacked: exactly collate's rows (without the end padding)."""
    samples = [sample([3, 4], [5, 6, 7], 0.25), sample([8, 9, 10, 11], [12], -2.0), sample([1], [2, 3])]
    padded, packed = collate(samples, [0, 1, 2], pad_multiple=8), collate_packed(samples, [0, 1, 2], pad_multiple=8)
    for name in ("tokens", "labels", "loss_mask", "advantages", "rollout_log_probs"):
        unpacked = packed.per_sequence(getattr(packed, name))
        assert unpacked.shape == (3, 5)
        assert torch.equal(unpacked, getattr(padded, name)[:, :5]), name
    assert padded.per_sequence(padded.loss_mask) is padded.loss_mask


def test_without_padding_there_is_no_padding_segment():
    mb = collate_packed([sample([1, 2], [3, 4]), sample([5], [6, 7, 8])], [1, 0], pad_multiple=2)
    assert mb.packing.cu_seqlens.tolist() == [0, 4, 8] and mb.sample_index.tolist() == [1, 0]
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 1, 2, 3, 4]]


def test_pack_and_unpack_are_inverse_and_unpack_carries_gradients():
    packing = PackedSequences.of_lengths([2, 4, 1], 10)
    assert packing.cu_seqlens.tolist() == [0, 2, 6, 7, 10] and packing.width == 10
    assert packing.positions().tolist() == [0, 1, 0, 1, 2, 3, 0, 0, 1, 2]
    row = torch.arange(10.0, requires_grad=True)
    unpacked = packing.unpack(row[None])
    assert unpacked.tolist() == [[0, 1, 0, 0], [2, 3, 4, 5], [6, 0, 0, 0]]
    assert packing.pack(unpacked.detach(), fill=-1).tolist() == [[0, 1, 2, 3, 4, 5, 6, -1, -1, -1]]
    (unpacked * torch.arange(1.0, 5.0)).sum().backward()
    assert row.grad.tolist() == [1, 2, 1, 2, 3, 4, 1, 0, 0, 0]


def test_widening_grows_the_padding_segment():
    assert PackedSequences.of_lengths([3, 2], 6).widened(9).cu_seqlens.tolist() == [0, 3, 5, 9]
    assert PackedSequences.of_lengths([3, 2], 5).widened(8).cu_seqlens.tolist() == [0, 3, 5, 8]
    with pytest.raises(ValueError, match=r"cannot pack sequences of lengths \[3, 2\] into a row of 4 columns"):
        PackedSequences.of_lengths([3, 2], 4)


def test_pad_to_shape_keeps_a_packed_micro_batch_one_row():
    mb = collate_packed([sample([1, 2], [3]), sample([4], [5, 6])], [0, 1])
    grown = pad_to_shape(mb, 1, 8)
    assert grown.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]]
    assert grown.packing.cu_seqlens.tolist() == [0, 3, 6, 8]
    assert grown.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert torch.equal(grown.per_sequence(grown.loss_mask), mb.per_sequence(mb.loss_mask))
    with pytest.raises(ValueError, match=r"cannot pad a \[1, 6\] packed micro-batch to \[2, 8\]"):
        pad_to_shape(mb, 2, 8)


def test_packing_plan_by_hand():
    # one rank, budget 10: 14 + 1 tokens cannot fit two rows of 10 -> 2 rows, longest first to the lightest:
    # 6 -> row 0, 4 -> row 1, 3 -> row 1 (7), 2 -> row 0 (8)
    assert plan_packed_micro_batches([4, 6, 2, 3], 1, 10) == [[[1, 2], [0, 3]]]
    # the padding multiple counts: rows of padded length <= 10 with multiple 4 hold <= 8 tokens
    assert plan_packed_micro_batches([5, 5, 5], 1, 10, pad_multiple=4) == [[[0], [1], [2]]]
    # a sample over the budget is packed alone
    assert plan_packed_micro_batches([30, 2, 3], 1, 10) == [[[0], [1, 2]]]
    # two DP ranks of 13 tokens each ({9, 3, 1} and {8, 3, 2}), the same number of micro-batches on each
    plan = plan_packed_micro_batches([9, 1, 8, 2, 3, 3], 2, 10)
    assert plan == [[[0], [1, 5]], [[2], [3, 4]]]


@pytest.mark.parametrize("seed", range(20))
def test_packing_plan_invariants(seed):
    generator = torch.Generator().manual_seed(seed)
    dp, budget, pad = 1 + seed % 3, 64, 1 + seed % 4
    lengths = (4 - 12 * torch.rand(6 * dp, generator=generator).log()).int().tolist()  # long-tailed
    lengths[int(torch.randint(len(lengths), (1,), generator=generator))] = 80  # one over the budget
    plan = plan_packed_micro_batches(lengths, dp, budget, pad)
    assert sorted(i for rank in plan for row in rank for i in row) == list(range(len(lengths)))
    assert len({len(rank) for rank in plan}) == 1 and all(row for rank in plan for row in rank)
    for rank in plan:
        for row in rank:
            packed = -(-sum(lengths[i] for i in row) // pad) * pad
            assert packed <= budget or len(row) == 1, (row, packed)


def test_micro_batches_for_rank_switches_layouts():
    samples = [sample([1] * p, [2] * r) for p, r in [(3, 9), (2, 2), (5, 1), (1, 7)]]
    packed = micro_batches_for_rank(samples, 2, 1, max_tokens=16, pad_multiple=2, pack=True)
    padded = micro_batches_for_rank(samples, 2, 1, max_tokens=16, pad_multiple=2)
    assert all(mb.packing is not None and mb.tokens.shape[0] == 1 for mb in packed)
    assert all(mb.packing is None for mb in padded)
    assert sum(mb.num_response_tokens for mb in packed) == sum(mb.num_response_tokens for mb in padded)


def test_packing_under_context_parallelism_is_refused():
    with pytest.raises(ConfigError, match=r"data.pack_sequences: must be false when parallel.cp > 1"):
        config_from_dict({"parallel": {"cp": 2, "world_size": 2}, "data": {"pack_sequences": True}})
    packed_tp2 = config_from_dict({"parallel": {"tp": 2, "world_size": 2}, "data": {"pack_sequences": True}})
    assert packed_tp2.data.pack_sequences

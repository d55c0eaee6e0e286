"""Micro-batch planning and the [prompt | response | padding] layout."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.learner.batching import (
    RolloutSample,
    collate,
    partition_for_data_parallel,
    plan_micro_batches,
    validate_samples,
)


def sample(prompt, response, advantage=1.0, log_probs=True):
    return RolloutSample(list(prompt), list(response), advantage,
                         [-0.1 * (k + 1) for k in range(len(response))] if log_probs else None)


def test_labels_are_shifted_per_sequence_and_the_mask_covers_the_response():
    samples = [sample([11, 12, 13], [21, 22], 0.5), sample([31], [41, 42, 43, 44], -1.0)]
    mb = collate(samples, [0, 1], pad_multiple=4)
    assert mb.tokens.tolist() == [[11, 12, 13, 21, 22, 0, 0, 0], [31, 41, 42, 43, 44, 0, 0, 0]]
    # column j predicts token j+1: the response token k of row i is predicted at prompt_i - 1 + k
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert mb.labels.tolist() == [[0, 0, 21, 22, 0, 0, 0, 0], [41, 42, 43, 44, 0, 0, 0, 0]]
    assert mb.response_start.tolist() == [2, 0]
    assert mb.advantages[0].tolist() == [0, 0, 0.5, 0.5, 0, 0, 0, 0]
    assert torch.allclose(mb.rollout_log_probs[1, :4], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert mb.position_ids[1].tolist() == list(range(8)) and mb.num_response_tokens == 6
    assert mb.sample_index.tolist() == [0, 1]


def test_without_rollout_log_probs():
    mb = collate([sample([1], [2], log_probs=False)], [0])
    assert mb.rollout_log_probs is None and mb.tokens.shape == (1, 2)


@pytest.mark.parametrize("bad, message", [
    (RolloutSample([], [1], 0.0), "sample 1: prompt and response must be non-empty"),
    (RolloutSample([1], [2, 3], 0.0, [-0.5]), "sample 1: 1 rollout log-probs for 2 response tokens"),
    (RolloutSample([1], [2], 0.0, None), "sample 1: rollout log-probs must be given for every sample or for none"),
])
def test_malformed_samples_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_samples([sample([1], [2]), bad])


def test_data_parallel_partition_is_even_and_balanced():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    parts = partition_for_data_parallel(lengths, 2)
    assert sorted(i for part in parts for i in part) == list(range(8))
    assert [len(part) for part in parts] == [4, 4]
    # 4 samples each: {100, 10, 10, 10} / {90, 80, 5, 5} is the best split the counts allow
    assert sorted(sum(lengths[i] for i in part) for part in parts) == [130, 180]
    with pytest.raises(ValueError, match="7 samples cannot be split evenly over 2 data-parallel ranks"):
        partition_for_data_parallel(lengths[:7], 2)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40), dp=st.sampled_from([1, 2, 4]),
       budget=st.integers(64, 2048), pad=st.sampled_from([1, 4, 8]))
def test_plan_covers_every_sample_once_with_equal_counts_under_budget(lengths, dp, budget, pad):
    lengths = lengths[: len(lengths) // dp * dp] or [1] * dp
    plan = plan_micro_batches(lengths, dp, budget, pad)
    assert len({len(rank) for rank in plan}) == 1  # the same number of micro-batches on every rank
    seen = sorted(i for rank in plan for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    for rank in plan:
        for mb in rank:
            assert mb, "no empty micro-batch"
            width = max(-(-lengths[i] // pad) * pad for i in mb)
            assert len(mb) * width <= budget or len(mb) == 1


def fewest_runs(sorted_lengths, cap):
    """Brute force: the fewest contiguous runs of cost rows x longest <= cap (a lone row always fits)."""
    best = [0] + [len(sorted_lengths) + 1] * len(sorted_lengths)
    for end in range(1, len(sorted_lengths) + 1):
        for start in range(end):
            rows = end - start
            if rows == 1 or rows * sorted_lengths[end - 1] <= cap:
                best[end] = min(best[end], best[start] + 1)
    return best[-1]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=2, max_size=16), budget=st.integers(50, 600))
def test_plan_uses_the_fewest_micro_batches_the_budget_allows(lengths, budget):
    lengths = lengths[: len(lengths) // 2 * 2]
    plan = plan_micro_batches(lengths, 2, budget)
    fewest = max(fewest_runs(sorted(lengths[i] for mb in rank for i in mb), budget) for rank in plan)
    assert len(plan[0]) == fewest


def test_a_sample_longer_than_the_budget_gets_a_micro_batch_of_its_own():
    plan = plan_micro_batches([500, 10, 10, 10], 1, max_tokens=100)
    assert [0] in plan[0] and sorted(i for mb in plan[0] for i in mb) == [0, 1, 2, 3]

"""Bounded staleness: which groups the learner may train on, by the weight versions their tokens came from."""

from megatron_rl.data.buffer import Group, RolloutBuffer, generated_by, version_number
from megatron_rl.data.datasets import Prompt
from megatron_rl.rollout.protocol import Generation


def generation(*spans: tuple[str, int, int]) -> Generation:
    return Generation([1], [2, 3], [-0.1, -0.2], {"type": "length", "length": 2}, spans[-1][0],
                      weight_versions=list(spans))


def group(*versions: str) -> Group:
    return Group(Prompt(0, [1], "1", {}), [generation((v, 0, 2)) for v in versions], [0.0] * len(versions))


def test_version_numbers():
    assert version_number("7") == 7 and version_number(3) == 3
    assert version_number("default") == 0 and version_number(None) == 0  # an engine's initial weights


def test_a_response_across_an_update_counts_as_its_oldest_tokens():
    assert generated_by(generation(("4", 0, 1), ("5", 1, 2))) == 4
    assert generated_by(Generation([1], [2], [-0.1], {"type": "stop"}, "6")) == 6  # no spans: the reported version


def test_groups_too_far_behind_are_dropped_and_counted():
    buffer = RolloutBuffer(max_staleness=1)
    buffer.put([group("3", "3"), group("2", "3"), group("4"), group("4")])
    taken = buffer.take(2, learner_version=4)
    assert [g.weight_version for g in taken] == [3, 4]  # the group with a version-2 response is 2 behind
    assert buffer.dropped_stale == 1
    assert len(buffer) == 1
    assert [g.weight_version for g in buffer.take(5, learner_version=4)] == [4]


def test_all_equal_rewards():
    assert group("1", "1").all_equal
    assert not Group(Prompt(0, [1], "1", {}), [generation(("1", 0, 2))] * 2, [1.0, 0.0]).all_equal

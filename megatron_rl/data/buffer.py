"""Rollout groups between the engines and the learner, with bounded staleness.

A group is one prompt's n responses with their rewards. Every response carries the weight version(s)
it was generated with; a group's version is the oldest of its responses' tokens. When the learner is at
version v, a group with v - version > max_staleness is too old to train on: `take` drops it and
counts it (in async mode a batch generated while the learner trained is one version behind).
"""

from collections import deque
from dataclasses import dataclass

from megatron_rl.data.datasets import Prompt
from megatron_rl.rollout.protocol import Generation


@dataclass
class Group:
    prompt: Prompt
    generations: list[Generation]
    rewards: list[float]

    @property
    def weight_version(self) -> int:
        return min(generated_by(g) for g in self.generations)

    @property
    def all_equal(self) -> bool:
        """Every response got the same reward: no GRPO signal (DAPO's dynamic sampling drops it)."""
        return max(self.rewards) == min(self.rewards)


def generated_by(generation: Generation) -> int:
    """The oldest weight version any token of the response was sampled with (a response generated across a
    weight update has tokens of two versions)."""
    return min(version_number(version) for version, _, _ in generation.weight_versions or
               [(generation.weight_version, 0, 0)])


def version_number(version: str | int | None) -> int:
    """An engine's weight_version as a number; an engine's initial weights ("default") are version 0."""
    try:
        return int(version)
    except (TypeError, ValueError):
        return 0


class RolloutBuffer:
    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self._groups: deque[Group] = deque()
        self.dropped_stale = 0

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, groups: list[Group]) -> None:
        self._groups.extend(groups)

    def take(self, count: int, learner_version: int) -> list[Group]:
        """Up to `count` groups, oldest first, skipping (and counting) those more than max_staleness behind."""
        taken = []
        while self._groups and len(taken) < count:
            group = self._groups.popleft()
            if learner_version - group.weight_version > self.max_staleness:
                self.dropped_stale += 1
                continue
            taken.append(group)
        return taken

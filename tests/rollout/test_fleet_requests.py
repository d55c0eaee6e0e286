"""How the fleet cuts prompts into /generate requests and retries what comes back aborted.

The engine here is a stand-in client in this process (ScriptedClient), so the test decides exactly which answers
are aborted; test_fleet.py runs the same paths against real `megatron-rl serve` processes.
"""

import threading

import pytest

from megatron_rl.rollout.engines import Engine
from megatron_rl.rollout.fleet import Fleet, FleetError
from megatron_rl.rollout.protocol import Generation


class ScriptedClient:
    """Answers prompt [k] with output [k, k]; the prompts listed in `abort_first` come back aborted the first
    `abort_times` times they are asked for. Records every request as its list of prompts."""

    url = "scripted://engine"

    def __init__(self, abort_first: set[int] = frozenset(), abort_times: int = 1):
        self.abort_first, self.abort_times = abort_first, abort_times
        self.requests: list[list[int]] = []
        self.asked: dict[int, int] = {}
        self._lock = threading.Lock()

    def generate_batch(self, prompts, sampling_params, *, rids=None, return_logprob=True):
        with self._lock:
            self.requests.append([p[0] for p in prompts])
            answers = []
            for prompt, rid in zip(prompts, rids, strict=True):
                k = prompt[0]
                self.asked[k] = self.asked.get(k, 0) + 1
                aborted = k in self.abort_first and self.asked[k] <= self.abort_times
                reason = {"type": "abort", "message": "scripted"} if aborted else {"type": "length", "length": 2}
                answers.append(Generation(list(prompt), [] if aborted else [k, k], [] if aborted else [-0.5, -0.5],
                                          reason, "1", rid))
            return answers

    def generate(self, input_ids, sampling_params, *, rid=None, return_logprob=True):
        return self.generate_batch([input_ids], [sampling_params], rids=[rid])[0]

    def health_generate(self) -> bool:
        return True


def fleet_of(client: ScriptedClient, max_retries: int = 3) -> Fleet:
    return Fleet([Engine(client)], max_concurrency=1, max_retries=max_retries)


def test_consecutive_prompts_share_a_request_the_last_one_shorter():
    client = ScriptedClient()
    fleet = fleet_of(client)
    generations = fleet.generate([[k] for k in range(10)], {"max_new_tokens": 2}, prompts_per_request=4)
    assert [g.output_ids for g in generations] == [[k, k] for k in range(10)]
    assert client.requests == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert (fleet.stats["requests"], fleet.stats["answered"], fleet.stats["retries"]) == (3, 10, 0)
    fleet.shutdown()


def test_aborted_prompts_of_a_request_are_retried_alone_and_the_others_kept():
    client = ScriptedClient(abort_first={1, 3})
    fleet = fleet_of(client)
    generations = fleet.generate([[k] for k in range(4)], {"max_new_tokens": 2}, prompts_per_request=4)
    assert [g.output_ids for g in generations] == [[k, k] for k in range(4)]
    assert client.requests == [[0, 1, 2, 3], [1, 3]]
    assert [g.rid for g in generations] == ["r0", "r4", "r2", "r5"]  # 1 and 3 answered by their retry
    assert client.asked == {0: 1, 1: 2, 2: 1, 3: 2}
    assert (fleet.stats["retries"], fleet.stats["engine_failures"], fleet.stats["duplicates"]) == (1, 0, 0)
    assert fleet.counts_since_last_call() == {"requests": 2, "retries": 1, "engine_failures": 0, "restarts": 0}
    assert fleet.counts_since_last_call() == {"requests": 0, "retries": 0, "engine_failures": 0, "restarts": 0}
    fleet.generate([[0]], {"max_new_tokens": 2})
    assert fleet.counts_since_last_call()["requests"] == 1
    fleet.shutdown()


def test_a_prompt_aborted_every_time_fails_with_its_index():
    client = ScriptedClient(abort_first={6}, abort_times=10)
    fleet = fleet_of(client, max_retries=2)
    with pytest.raises(FleetError, match=r"prompts 6 failed 3 times \(rollout.max_retries = 2\)") as failure:
        fleet.generate([[k] for k in range(8)], {"max_new_tokens": 2}, prompts_per_request=4)
    assert str(failure.value).count("scripted://engine: aborted (scripted)") == 3
    assert client.requests[-2:] == [[6], [6]]  # retried alone, as a plain request
    fleet.shutdown()


def test_prompts_per_request_must_be_positive():
    fleet = fleet_of(ScriptedClient())
    with pytest.raises(ValueError, match="prompts_per_request must be >= 1, got 0"):
        fleet.generate([[0]], {"max_new_tokens": 2}, prompts_per_request=0)
    fleet.shutdown()

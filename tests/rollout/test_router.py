"""sglang-router (the real Rust router from PyPI) in front of two real `megatron-rl serve` processes.

/generate goes through the router, weight updates go to each engine directly: the engines are told apart by
the weight_version each one holds, and the router's answers are the engines' own answers, token for token.
"""

import os
import secrets
import signal
import threading
import time

import pytest
import torch

from megatron_rl.config.sections import EngineSpec, RolloutConfig, RouterConfig
from megatron_rl.data.toy_task import write_toy_task
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import launch_engines
from megatron_rl.rollout.fleet import Fleet
from megatron_rl.rollout.launcher import EngineStartError
from megatron_rl.rollout.router import launch_router

PROMPTS = [[1, 5, 7, 8, 9, 10, 11, 32 + i % 10, 2, 7, 1, 6, 7] for i in range(16)]  # "Repeat the number: d"


def seeded(seed: int) -> dict:
    return {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": seed}


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    model_dir = write_toy_task(tmp_path_factory.mktemp("toy"), num_prompts=10) / "model"
    config = RolloutConfig(engines=[EngineSpec(port=free_port()), EngineSpec(port=free_port())], startup_timeout=180,
                           router=RouterConfig(enabled=True, port=free_port(), metrics_port=free_port(),
                                               policy="round_robin", health_check_interval=1))
    logs = tmp_path_factory.mktemp("logs")
    token = secrets.token_hex(8)
    engines = launch_engines(config, str(model_dir), logs, token)
    try:
        router = launch_router(config, engines, logs, token)
    except BaseException:
        for engine in engines:
            engine.process.stop()
        raise
    yield config, engines, router, token, logs
    for process in [router.process] + [engine.process for engine in engines]:
        process.stop()


def label_engines(engines) -> None:
    """Give engine i the weight_version 'engine-i' (its weights unchanged: the same tensor sent back)."""
    for index, engine in enumerate(engines):
        name = "model.norm.weight"
        values = engine.client.get_weights_by_name(name, truncate_size=10**6)
        engine.client.begin_weight_update()
        engine.client.update_weights_from_tensor([(name, torch.tensor(values))], weight_version=f"engine-{index}")
        engine.client.end_weight_update()


def test_generate_through_the_router_is_the_engines_own_answer(rollout):
    _, engines, router, _, _ = rollout
    label_engines(engines)
    fleet = Fleet(engines, max_concurrency=4, max_retries=2, router=router)
    through_router = [fleet.generate([prompt], seeded(seed))[0] for seed, prompt in enumerate(PROMPTS[:8])]
    assert {g.weight_version for g in through_router} == {"engine-0", "engine-1"}  # round robin over both
    for seed, generation in enumerate(through_router):
        engine = engines[int(generation.weight_version[-1])]
        direct = engine.client.generate(PROMPTS[seed], seeded(seed))
        assert (generation.output_ids, generation.output_logprobs) == (direct.output_ids, direct.output_logprobs)
    requests = fleet.stats["requests"]
    group = fleet.generate(PROMPTS[:4], [seeded(seed) for seed in range(4)], prompts_per_request=4)
    assert fleet.stats["requests"] == requests + 4  # the router takes one sampling_params per request
    assert [g.output_ids for g in group] == [g.output_ids for g in through_router[:4]]
    fleet.shutdown(stop_engines=False)


def test_a_batch_through_the_router_is_answered_once_each_while_an_engine_is_killed(rollout):
    config, engines, router, _, _ = rollout
    resynced = []
    fleet = Fleet(engines, max_concurrency=4, max_retries=5, resync=resynced.append, router=router)
    victim = engines[1]

    def kill_once_busy():  # round robin: once the router holds requests, so does each engine
        while router.in_flight < 8:
            time.sleep(0.005)
        time.sleep(0.5)
        os.kill(victim.process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_busy)
    killer.start()
    prompts = PROMPTS * 3
    generations = fleet.generate(prompts, {"temperature": 1.0, "max_new_tokens": 48, "ignore_eos": True})
    killer.join()
    assert len(generations) == len(prompts) and all(g is not None for g in generations)
    assert [g.prompt_ids for g in generations] == prompts
    assert all(len(g.output_ids) == 48 for g in generations)
    assert fleet.stats["answered"] == len(prompts) and fleet.stats["duplicates"] == 0
    deadline = time.monotonic() + 180
    while fleet.stats["restarts"] < 1 and time.monotonic() < deadline:  # the fleet restarts the dead engine
        time.sleep(0.5)
    assert fleet.stats["restarts"] == 1 and resynced == [victim] and victim.process.alive()
    fleet.shutdown(stop_engines=False)


def test_the_router_needs_its_package_and_free_ports(rollout, monkeypatch, tmp_path):
    config, engines, _, token, _ = rollout
    engine_port = int(engines[0].url.rsplit(":", 1)[1])
    busy = config.model_copy(update={"router": config.router.model_copy(update={"port": engine_port})})
    with pytest.raises(EngineStartError, match=r"rollout.router.port: something already listens"):
        launch_router(busy, engines, tmp_path, token)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineStartError, match=r"sglang-router package is not installed.*megatron-rl\[router\]"):
        launch_router(config, engines, tmp_path, token)
    attach = config.model_copy(update={"router": RouterConfig(enabled=True, launch=False, port=free_port())})
    with pytest.raises(EngineStartError, match=r"launch: false.*does not answer /health_generate"):
        launch_router(attach, engines, tmp_path, token)

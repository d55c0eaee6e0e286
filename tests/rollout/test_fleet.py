"""The fleet and weight sync against two real `megatron-rl serve` processes.

- weight sync: a push of new weights (several buckets over the gloo weight-update groups) reaches both engines:
  their greedy tokens and logprobs equal a local transformers copy with the same weights; verification catches an
  engine that holds other values.
- the "disk" transport: safetensors files rewritten in place (same inodes) reach both engines as exactly.
- faults: one engine is killed (SIGKILL) mid-batch; the batch completes with every prompt answered exactly once,
  and the engine is restarted and re-synced to the current weight version (over either transport).
"""

import os
import secrets
import signal
import threading
import time

import pytest
import torch

from megatron_rl.config.sections import EngineSpec, RolloutConfig, WeightSyncConfig
from megatron_rl.data.toy_task import write_toy_task
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import launch_engines
from megatron_rl.rollout.fleet import Fleet
from megatron_rl.rollout.weight_sync import WeightSync, WeightSyncError

PROBE = [1, 5, 7, 8, 9, 10, 11, 32, 2, 7, 1, 6, 7]  # the toy chat prompt "Repeat the number: 7"
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"), num_prompts=10) / "model"


@pytest.fixture(scope="module")
def engines(model_dir, tmp_path_factory):
    rollout = RolloutConfig(engines=[EngineSpec(port=free_port()), EngineSpec(port=free_port())], startup_timeout=120)
    started = launch_engines(rollout, str(model_dir), tmp_path_factory.mktemp("logs"), secrets.token_hex(8))
    yield started
    for engine in started:
        engine.process.stop()


def new_weights(model_dir, scale: float):
    """The toy model's HF tensors, perturbed; and a transformers model holding them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(int(scale * 1000))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    tensors = [(name, tensor.detach().clone()) for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"]  # tied to the embedding
    return tensors, model.eval()


def local_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def storages(named_tensors) -> int:
    return len({tensor.untyped_storage().data_ptr() for _, tensor in named_tensors})


def mixed_dtype_weights(model_dir, scale: float):
    """new_weights with the norms as bfloat16: buckets of mixed dtypes (the engines cast them back to float32)."""
    tensors, reference = new_weights(model_dir, scale)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(parameter.bfloat16().float())
    return [(name, t.bfloat16() if name.endswith("norm.weight") else t) for name, t in tensors], reference


def assert_engines_serve(engines, reference, version: str):
    """Every engine is at `version` and answers the probe greedily as the local reference model does."""
    expected_tokens, expected_logprobs = local_greedy(reference, PROBE, GREEDY["max_new_tokens"])
    for engine in engines:
        generation = engine.client.generate(PROBE, GREEDY)
        assert generation.weight_version == version
        assert generation.output_ids == expected_tokens
        assert max(abs(a - b) for a, b in zip(generation.output_logprobs, expected_logprobs, strict=True)) <= 1e-5


def test_push_reaches_every_engine_exactly(engines, model_dir):
    tensors, reference = mixed_dtype_weights(model_dir, scale=0.05)
    sync = WeightSync(engines, WeightSyncConfig(bucket_mb=0.05, verify="checksum", verify_tensors=6))
    report = sync.push(tensors, version=7)
    assert report.buckets > 2 and report.tensors == len(tensors)
    assert storages(sync.latest) == report.buckets  # flattened: the kept copies are views into one tensor a bucket
    assert len(report.verified) == 6
    assert_engines_serve(engines, reference, "7")
    # negative control: one engine gets other values for one tensor behind the sync's back
    name, tensor = tensors[0]
    engines[1].client.begin_weight_update()
    engines[1].client.update_weights_from_tensor([(name, tensor + 1.0)], weight_version="7")
    engines[1].client.end_weight_update()
    with pytest.raises(WeightSyncError, match=name):
        sync._verify(engines, tensors, 7)
    sync.close()
    per_tensor = WeightSync(engines, WeightSyncConfig(bucket_mb=0.05, verify="checksum", flatten=False))
    per_tensor.push(tensors, version=8)  # and a push repairs it, one broadcast per tensor
    assert storages(per_tensor.latest) == len(tensors)
    assert_engines_serve(engines, reference, "8")
    per_tensor.close()


def test_a_disk_push_rewrites_its_files_in_place_and_reaches_every_engine_exactly(engines, model_dir, tmp_path):
    sync = WeightSync(engines, WeightSyncConfig(bucket_mb=0.05, verify="checksum", verify_tensors=6,
                                                transport="disk", disk_dir=str(tmp_path)))
    files = sync._files.path
    assert files.parent == tmp_path and (files.stat().st_mode & 0o777) == 0o700
    first, _ = mixed_dtype_weights(model_dir, scale=0.02)
    report = sync.push(first, version=21)
    written = sorted(files.iterdir())
    assert report.buckets > 2 and len(written) == report.buckets and report.tensors == len(first)
    inodes = [path.stat().st_ino for path in written]
    tensors, reference = mixed_dtype_weights(model_dir, scale=0.04)
    report = sync.push(tensors, version=22)
    assert [path.stat().st_ino for path in sorted(files.iterdir())] == inodes  # the same files, rewritten
    assert len(report.verified) == 6
    assert_engines_serve(engines, reference, "22")
    sync.close()
    assert not files.exists()


@pytest.mark.parametrize(("transport", "prompts_per_request"), [("distributed", 1), ("disk", 4)])
def test_killed_engine_mid_batch_every_prompt_answered_once_then_resynced(engines, model_dir, transport,
                                                                          prompts_per_request, tmp_path):
    tensors, reference = new_weights(model_dir, scale=0.03)
    sync = WeightSync(engines, WeightSyncConfig(verify="checksum", transport=transport, disk_dir=str(tmp_path)))
    sync.push(tensors, version=11)
    fleet = Fleet(engines, max_concurrency=8, max_retries=3, resync=sync.resync)
    prompts = [PROBE[:-1] + [12 + i % 20, 2] for i in range(48)]
    params = {"temperature": 1.0, "max_new_tokens": 48, "ignore_eos": True}
    victim = engines[0]
    restarts = victim.restarts + 1

    def kill_once_busy():  # as soon as the victim holds requests: they are lost with it
        while victim.in_flight == 0:
            time.sleep(0.005)
        os.kill(victim.process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_busy)
    killer.start()
    generations = fleet.generate(prompts, params, prompts_per_request)
    killer.join()
    assert [g.prompt_ids for g in generations] == prompts
    assert all(len(g.output_ids) == 48 and g.weight_version == "11" for g in generations)
    assert fleet.stats["answered"] == len(prompts) and fleet.stats["duplicates"] == 0
    assert fleet.stats["engine_failures"] >= 1 and fleet.stats["retries"] >= 1  # the kill hit requests in flight

    deadline = time.monotonic() + 120
    while not (victim.ready and victim.restarts == restarts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.ready and victim.restarts == restarts, victim.process.log_tail()
    assert_engines_serve([victim], reference, "11")
    fleet.shutdown(stop_engines=False)
    sync.close()


def test_an_engine_nobody_can_restart_is_dropped_with_a_clear_error():
    from megatron_rl.rollout.engines import Engine
    from megatron_rl.rollout.fleet import FleetError
    from megatron_rl.rollout.protocol import EngineClient

    dead = Engine(EngineClient(f"http://127.0.0.1:{free_port()}", token="t", timeout=5))  # attached, nothing listens
    fleet = Fleet([dead], max_concurrency=2, max_retries=3)
    with pytest.raises(FleetError, match="no rollout engine is left"):
        fleet.generate([PROBE], GREEDY)
    assert not dead.ready and dead.failures == 1
    fleet.shutdown()


def test_per_prompt_seeds_give_each_prompt_its_own_samples_wherever_it_runs(engines):
    fleet = Fleet(engines, max_concurrency=3, max_retries=1)
    params = [{"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": 100 + i}
              for i in range(12)]
    generations = fleet.generate([PROBE] * 12, params)
    assert len({tuple(g.output_ids) for g in generations}) > 1  # the same prompt, other seeds: other samples
    for engine in engines:
        for i in (0, 7):
            alone = engine.client.generate(PROBE, params[i])
            assert alone.output_ids == generations[i].output_ids  # logprobs: batched matmuls round differently
            assert max(map(abs, torch.tensor(alone.output_logprobs) - torch.tensor(generations[i].output_logprobs)))\
                <= 1e-5
    grouped = Fleet(engines, max_concurrency=3, max_retries=1)
    assert [g.output_ids for g in grouped.generate([PROBE] * 12, params, prompts_per_request=5)] == \
        [g.output_ids for g in generations]  # the same samples, whichever request carries them
    assert (fleet.stats["requests"], grouped.stats["requests"]) == (12, 3)
    grouped.shutdown(stop_engines=False)
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        fleet.generate([PROBE] * 3, params[:2])
    fleet.shutdown(stop_engines=False)


def test_retries_are_bounded_and_name_the_prompts(engines):
    from megatron_rl.rollout.fleet import FleetError

    fleet = Fleet(engines, max_concurrency=2, max_retries=2)
    bad = {"temperature": 1.0, "max_new_tokens": 4, "no_such_key": 1}  # every engine answers 400
    with pytest.raises(FleetError, match=r"prompts 0-2 failed 3 times \(rollout.max_retries = 2\)"):
        fleet.generate([PROBE] * 3, bad, prompts_per_request=3)
    assert all(e.ready for e in engines)  # a bad request is not a dead engine: /health_generate still answers
    fleet.shutdown(stop_engines=False)


def test_a_launched_engine_stops_when_its_launcher_is_killed(model_dir, tmp_path):
    """The trainer may die by SIGKILL (out of memory): its engines must not outlive it and hold their ports."""
    import subprocess
    import sys

    launcher = (
        "import sys, secrets\n"
        "from megatron_rl.config.sections import EngineSpec\n"
        "from megatron_rl.rollout.launcher import ServerProcess, cpu_server_command\n"
        "from megatron_rl.rollout.protocol import EngineClient\n"
        f"spec = EngineSpec(port={free_port()})\n"
        f"process = ServerProcess(cpu_server_command(spec, {str(model_dir)!r}), 't', {str(tmp_path / 'e.log')!r}, "
        "watches_parent=True)\n"
        "process.start()\n"
        "process.wait_until_ready(EngineClient(f'http://127.0.0.1:{spec.port}', token='t'), 120)\n"
        "print(process.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    server_pid = int(parent.stdout.readline())
    os.kill(server_pid, 0)  # alive
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the engine outlived its launcher by 30 s")
    assert "launching process" in (tmp_path / "e.log").read_text()

"""The rollout contract (rollout/protocol.py), for real, against one server per module.

By default the server is `megatron-rl serve` (a subprocess, one CPU thread) on a tiny random Qwen3 built here.
With MEGATRON_RL_PROTOCOL_URL set, the same checks run against that server instead (e.g. real SGLang 0.5.23):
MEGATRON_RL_PROTOCOL_MODEL is the checkpoint it serves (read here for the reference, and perturbed copies are
written next to the test's tmp files for /update_weights_from_disk, so the server must see this filesystem),
MEGATRON_RL_PROTOCOL_TOKEN its API key, MEGATRON_RL_PROTOCOL_TOL the logprob tolerance (its dtype's noise), and
MEGATRON_RL_PROTOCOL_WITHOUT the optional features it lacks (comma-separated, checked to be really missing):
  get_weights_by_name  the read-back of a parameter's values (SGLang 0.5.23 has it for Llama-family model classes
                       only: for Qwen it answers 400 "Get parameter by name failed")
  sampling_seed        a request's sampling_seed fixing its tokens (SGLang honours it only with
                       --enable-deterministic-inference, which its CPU engine refuses)
What only our server does (safetensors tensor payloads, its bind and token rules, shutdown, logs) is skipped there.
tests/sglang/conformance.sh (`make test-sglang`) runs this suite against real SGLang on CPU.

The reference for every generated token y_t of a prompt p is one unpadded transformers forward of p + y in fp32:
greedy tokens are its argmax and every logprob is log_softmax(logits / T)[y_t] (T = 1 when greedy).
"""

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_rl.cli import build_parser
from megatron_rl.config.sections import WeightSyncConfig
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import Engine
from megatron_rl.rollout.flat_bucket import LOAD_FORMAT, flatten
from megatron_rl.rollout.process_group import destroy_custom_process_group, init_custom_process_group
from megatron_rl.rollout.protocol import EngineClient, EngineError, Generation
from megatron_rl.rollout.weight_files import WeightFiles
from megatron_rl.rollout.weight_sync import WeightSync, buckets_of

EXTERNAL_URL = os.environ.get("MEGATRON_RL_PROTOCOL_URL")
TOL = float(os.environ.get("MEGATRON_RL_PROTOCOL_TOL", "1e-5"))
OPTIONAL = {"get_weights_by_name", "sampling_seed"}
WITHOUT = {f for f in os.environ.get("MEGATRON_RL_PROTOCOL_WITHOUT", "").split(",") if f} if EXTERNAL_URL else set()
if WITHOUT - OPTIONAL:
    raise ValueError(f"MEGATRON_RL_PROTOCOL_WITHOUT: unknown features {sorted(WITHOUT - OPTIONAL)}, know {OPTIONAL}")
ours_only = pytest.mark.skipif(EXTERNAL_URL is not None, reason="a feature of megatron-rl serve, not of the contract")
PROMPTS = [[5, 9, 2], list(range(20, 29)), [77], list(range(40, 57))]
GREEDY = {"temperature": 0.0, "ignore_eos": True}
LONG = 900  # output tokens of a request that is still running when the test pauses or aborts it (> 1 s)
LONG_TOL = max(TOL, 5e-5)  # over ~900 positions, incremental decoding and one forward differ by up to ~1.2e-5
PROBES = ["model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
TINY = Qwen3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=1024,
                   initializer_range=0.2, tie_word_embeddings=True, eos_token_id=1)


# --- the server and its reference --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    if EXTERNAL_URL:
        path = os.environ.get("MEGATRON_RL_PROTOCOL_MODEL")
        if not path:
            pytest.fail("MEGATRON_RL_PROTOCOL_URL needs MEGATRON_RL_PROTOCOL_MODEL (the checkpoint it serves)")
        return path
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


def write_tiny_checkpoint(directory) -> str:
    torch.manual_seed(0)
    Qwen3ForCausalLM(TINY).save_pretrained(directory)
    return str(directory)


def load_reference(checkpoint: str):
    """The served weights, in the test process (fp32)."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(checkpoint):
    return load_reference(checkpoint)


@pytest.fixture(scope="module")
def token():
    return os.environ.get("MEGATRON_RL_PROTOCOL_TOKEN") if EXTERNAL_URL else secrets.token_hex(16)


class Served:
    """The server under test: its URL, and (ours) its process and log."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, log: Path | None = None):
        self.url, self.process, self.log = url, process, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


@pytest.fixture(scope="module")
def server(checkpoint, token, tmp_path_factory):
    if EXTERNAL_URL:
        yield Served(EXTERNAL_URL)
        return
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    command = [sys.executable, "-m", "megatron_rl.cli", "serve", "--model-path", checkpoint, "--port", str(port),
               "--threads", "1", "--max-batch-size", "8"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MEGATRON_RL_SERVE_TOKEN": token})
    served = Served(f"http://127.0.0.1:{port}", process, log)
    probe = EngineClient(served.url, timeout=10)
    deadline = time.monotonic() + 120
    while not probe.health_generate():
        assert process.poll() is None, f"megatron-rl serve exited ({process.returncode}):\n{served.log_text()}"
        assert time.monotonic() < deadline, f"megatron-rl serve not ready in 120 s:\n{served.log_text()}"
        time.sleep(0.2)
    yield served
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server, token):
    return EngineClient(server.url, token=token, timeout=120)


@pytest.fixture
def restore(client, checkpoint):
    """Tests that change the weights or pause end with the served checkpoint back, generating, and no weight-update
    session open (SGLang refuses to begin one while one is open)."""
    yield
    try:
        client.end_weight_update()  # left open by a test that failed inside it
    except EngineError as error:
        if error.status != 400:  # 400: none was open
            raise
    client.continue_generation()
    client.update_weights_from_disk(checkpoint, weight_version="restored")


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of `model` with every weight moved by scale * N(0, 1) noise."""
    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return copy


def hf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The model's HF-named tensors, lm_head.weight left out when tied to the embedding (as checkpoints do)."""
    tied = model.config.tie_word_embeddings
    return [(name, tensor.detach().clone()) for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")]


# --- references ------------------------------------------------------------------------------------------

def teacher_forced(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len(output), V] log_softmax(logits / T) predicting each output token, from one forward of prompt + output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(output)] / temperature, -1)


def assert_greedy(model, generation: Generation, start: int = 0, tol: float = TOL) -> None:
    """Output tokens [start:] are the model's argmax and their logprobs its log_softmax."""
    logprobs = teacher_forced(model, generation.prompt_ids, generation.output_ids)[start:]
    output = torch.tensor(generation.output_ids[start:])
    assert output.tolist() == logprobs.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(generation.output_logprobs[start:]),
                               logprobs.gather(-1, output[:, None]).squeeze(-1), rtol=0, atol=tol)


def assert_serves(client: EngineClient, model, version: str) -> None:
    """The server generates as `model` does, holds its values (if it can tell), and says it is `version`."""
    for generation in client.generate_batch(PROMPTS[:2], {**GREEDY, "max_new_tokens": 8}):
        assert generation.weight_version == version
        assert_greedy(model, generation)
    assert client.get_weight_version() == version
    if "get_weights_by_name" in WITHOUT:
        return
    state = model.state_dict()
    for name in PROBES:
        torch.testing.assert_close(torch.tensor(client.get_weights_by_name(name, truncate_size=20)),
                                   state[name].flatten()[:20], rtol=0, atol=TOL)


def in_thread(call, *args, **kwargs):
    """Run call(*args, **kwargs) in a thread; the returned function joins it and returns its result (or raises)."""
    box = {}

    def run():
        try:
            box["result"] = call(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the joiner
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = 120.0):
        thread.join(timeout)
        assert not thread.is_alive(), f"{call.__name__} did not return within {timeout} s"
        if "error" in box:
            raise box["error"]
        return box["result"]

    join.done = lambda: not thread.is_alive()
    return join


def raw_post(url: str, endpoint: str, data: bytes, token: str | None):
    """(status, decoded JSON answer) of a POST with an arbitrary body."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + endpoint, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# --- generation ---------------------------------------------------------------------------------------

def test_greedy_generation_is_the_argmax_with_untempered_logprobs(client, base):
    generation = client.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 12}, rid="greedy-1")
    assert generation.rid == "greedy-1"
    assert generation.finish_reason == {"type": "length", "length": 12}
    assert len(generation.output_ids) == len(generation.output_logprobs) == 12
    assert generation.weight_version == client.get_weight_version()
    assert_greedy(base, generation)


def test_sampled_logprobs_are_tempered_and_before_top_k_top_p(client, base):
    temperature = 0.7
    params = [{"temperature": temperature, "top_k": 5, "top_p": 0.9, "max_new_tokens": 24, "sampling_seed": seed,
               "ignore_eos": True} for seed in range(len(PROMPTS))]
    generations = client.generate_batch(PROMPTS, params)
    ranks = []
    for generation in generations:
        output = torch.tensor(generation.output_ids)
        tempered = teacher_forced(base, generation.prompt_ids, generation.output_ids, temperature)
        chosen = tempered.gather(-1, output[:, None])
        torch.testing.assert_close(torch.tensor(generation.output_logprobs), chosen.squeeze(-1), rtol=0, atol=TOL)
        ranks += (tempered > chosen).sum(-1).tolist()
        # negative control: the untempered logprobs are measurably different
        plain = teacher_forced(base, generation.prompt_ids, generation.output_ids).gather(-1, output[:, None])
        assert (torch.tensor(generation.output_logprobs) - plain.squeeze(-1)).abs().max() > 1e-3
    assert max(ranks) <= 4  # top_k = 5 filtered what was sampled
    assert len(set(ranks)) > 1  # and it was sampled, not greedy
    again = client.generate_batch(PROMPTS, params)  # a sampling_seed fixes the tokens (declared missing: it does not)
    same = [g.output_ids for g in again] == [g.output_ids for g in generations]
    assert same == ("sampling_seed" not in WITHOUT)


def test_a_batch_answers_each_prompt_in_order(client, base):
    lengths = [3, 7, 1, 5]
    generations = client.generate_batch(PROMPTS, [{**GREEDY, "max_new_tokens": n} for n in lengths],
                                        rids=[f"b{i}" for i in range(len(PROMPTS))])
    assert [g.prompt_ids for g in generations] == PROMPTS
    assert [g.rid for g in generations] == ["b0", "b1", "b2", "b3"]
    assert [len(g.output_ids) for g in generations] == lengths
    for generation in generations:
        assert_greedy(base, generation)
    alone = client.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 5})
    assert alone.output_ids == generations[3].output_ids


def test_generate_takes_the_fields_sglang_router_adds(server, token, base):
    """sglang-router 0.3.2 re-sends every request with these GenerateReqInput fields (measured)."""
    body = {"model": None, "input_ids": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 3},
            "return_logprob": True, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
            "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
            "return_entropy": False, "rid": "through-router"}
    status, answer = raw_post(server.url, "/generate", json.dumps(body).encode(), token)
    assert status == 200, answer
    assert answer["meta_info"]["id"] == "through-router" and len(answer["output_ids"]) == 3


def test_stop_token_and_length_finish_reasons(client, base):
    free = client.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 10})
    stop = free.output_ids[4]
    first = free.output_ids.index(stop)
    assert base.config.eos_token_id not in free.output_ids[:first + 1]  # so only the stop token can end it early
    # without ignore_eos: in SGLang it disables stop_token_ids too, not only the eos ids
    stopped = client.generate(PROMPTS[0], {"temperature": 0.0, "max_new_tokens": 10, "stop_token_ids": [stop]})
    assert stopped.finish_reason == {"type": "stop", "matched": stop}
    assert stopped.output_ids == free.output_ids[:first + 1]
    assert free.finish_reason == {"type": "length", "length": 10}
    assert_greedy(base, stopped)
    ignored = client.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 10, "stop_token_ids": [stop]})
    assert ignored.output_ids == free.output_ids and ignored.finish_reason == free.finish_reason


def test_concurrent_clients_are_batched_and_answered_exactly(client, base, server):
    clients = 64  # as many connections at once as a fleet opens per engine
    joins = [in_thread(client.generate, PROMPTS[i % 4], {**GREEDY, "max_new_tokens": 8}, rid=f"c{i}")
             for i in range(clients)]
    generations = [join() for join in joins]
    assert [g.rid for g in generations] == [f"c{i}" for i in range(clients)]
    for generation in generations:
        assert_greedy(base, generation)
    if server.process is not None:  # our server logs one line per batch
        sizes = [int(n) for n in re.findall(r"batch: (\d+) requests, \d+ prompt \+ \d+ output tokens, [\d.]+ s",
                                            server.log_text())]
        assert max(sizes) >= 2, sizes


def test_get_weights_by_name_is_there_unless_declared_missing(client, base):
    if "get_weights_by_name" not in WITHOUT:
        values = client.get_weights_by_name("model.norm.weight", truncate_size=5)
        torch.testing.assert_close(torch.tensor(values), base.model.norm.weight[:5].detach(), rtol=0, atol=TOL)
        return
    with pytest.raises(EngineError) as error:  # declared missing: it really is (else drop it from the list)
        client.get_weights_by_name("model.norm.weight", truncate_size=5)
    assert error.value.status == 400


def test_health(client):
    assert client.health()
    assert client.health_generate()
    client.flush_cache()
    assert not EngineClient("http://127.0.0.1:1").health()  # negative control: nothing listens there


# --- weight updates ---------------------------------------------------------------------------------------

def test_update_from_disk(client, base, tmp_path, restore):
    assert_serves(client, base, client.get_weight_version())
    new = perturbed(base, seed=1)
    new.save_pretrained(tmp_path)
    client.update_weights_from_disk(str(tmp_path), weight_version="disk-1")
    assert_serves(client, new, "disk-1")


def test_update_from_disk_takes_the_weight_sync_files(client, base, tmp_path, restore):
    """The "disk" transport's directory: bucket files of weights only, no config.json, rewritten in place."""
    files = WeightFiles(tmp_path)
    for version, seed in (("files-1", 3), ("files-2", 4)):
        new = perturbed(base, seed=seed)
        files.write(buckets_of(hf_tensors(new), bucket_bytes=64 * 1024))
        assert len(list(files.path.iterdir())) > 2
        client.update_weights_from_disk(str(files.path), weight_version=version)
        assert_serves(client, new, version)
    files.close()


def test_a_push_right_after_a_batch_is_answered_loads_and_flushes(client, base, tmp_path, restore):
    """The trainer's order: a batch is answered and the new weights are pushed at once. SGLang answers a request
    before it has freed it, and refuses a flush until then: the push loads without flushing, then flushes waiting
    for it (rollout.weight_sync.flush_wait)."""
    sync = WeightSync([Engine(client)], WeightSyncConfig(transport="disk", disk_dir=str(tmp_path), verify="none"))
    try:
        for version, seed in ((101, 11), (102, 12), (103, 13)):
            new = perturbed(base, seed=seed)
            client.generate_batch(PROMPTS, {"temperature": 1.0, "max_new_tokens": 16})
            sync.push(hf_tensors(new), version=version)
            assert_serves(client, new, str(version))
    finally:
        sync.close()


@ours_only
def test_update_from_tensor_takes_safetensors_not_pickle(client, base, restore):
    new = perturbed(base, seed=2)
    client.begin_weight_update()
    client.update_weights_from_tensor(hf_tensors(new), weight_version="tensor-2")
    client.end_weight_update()
    assert_serves(client, new, "tensor-2")
    client.begin_weight_update()
    status, answer = raw_post(client.url, "/update_weights_from_tensor",
                              json.dumps({"serialized_named_tensors": ["gASV"]}).encode(), client.token)
    assert status == 400 and re.search("serialized_named_tensors.*pickle", answer["message"]), answer
    client.end_weight_update()
    assert_serves(client, new, "tensor-2")


@pytest.fixture
def weight_group(client):
    """A gloo weight-update group: this process is rank 0, the server rank 1."""
    port, name = free_port(), "protocol-test"
    joined = in_thread(client.init_weights_update_group, master_address="127.0.0.1", master_port=port,
                       rank_offset=1, world_size=2, group_name=name, backend="gloo")
    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, name, timeout=timedelta(seconds=60))
    joined()
    yield name, group
    client.destroy_weights_update_group(name)
    destroy_custom_process_group(group)


@pytest.fixture
def learner_under_torchrun(monkeypatch):
    """What torchrun sets in a learner rank: c10d's tcp:// rendezvous would then join torchrun's store as a
    client, and no one would host the weight-update group's store."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")


def test_update_from_distributed(client, base, learner_under_torchrun, weight_group, restore):
    name, group = weight_group
    new = perturbed(base, seed=3)
    # one tensor travels as bfloat16 (its `dtypes` entry says so); the server casts it to its own dtype
    with torch.no_grad():
        new.model.norm.weight.copy_(new.model.norm.weight.bfloat16().float())
    tensors = [(n, t.bfloat16() if n == "model.norm.weight" else t) for n, t in hf_tensors(new)]
    client.begin_weight_update()
    received = in_thread(client.update_weights_from_distributed, names=[n for n, _ in tensors],
                         dtypes=[str(t.dtype).removeprefix("torch.") for _, t in tensors],
                         shapes=[list(t.shape) for _, t in tensors], group_name=name, weight_version="dist-3")
    for _, tensor in tensors:
        torch.distributed.broadcast(tensor.contiguous(), src=0, group=group)
    received()
    client.end_weight_update()
    assert_serves(client, new, "dist-3")


def send_over(client: EngineClient, weight_group, tensors: list[tuple[str, torch.Tensor]], version: str,
              flattened: bool) -> None:
    """One /update_weights_from_distributed of `tensors` in its own session, with rank 0's broadcasts: one per
    tensor, or one flattened bucket packed as WeightSync packs it."""
    name, group = weight_group
    broadcasts = [tensor.contiguous() for _, tensor in tensors]
    if flattened:
        flat, tensors = flatten(tensors)
        broadcasts = [flat]
    client.begin_weight_update()
    received = in_thread(client.update_weights_from_distributed, names=[n for n, _ in tensors],
                         dtypes=[str(t.dtype).removeprefix("torch.") for _, t in tensors],
                         shapes=[list(t.shape) for _, t in tensors], group_name=name, weight_version=version,
                         load_format=LOAD_FORMAT if flattened else None)
    for tensor in broadcasts:
        torch.distributed.broadcast(tensor, src=0, group=group)
    received()
    client.end_weight_update()


def wait_idle(client: EngineClient) -> None:
    """Until no request runs: SGLang answers a generation before it frees the request, and an update's cache flush
    fails while one runs. /flush_cache?timeout=S waits up to S seconds for that (ours has nothing to wait for)."""
    request = urllib.request.Request(client.url + "/flush_cache?timeout=30", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {client.token}"} if client.token else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def served_state(client: EngineClient, model) -> tuple:
    """What the server serves, exactly: greedy tokens and logprobs of PROMPTS, and (if it can tell) every value of
    every parameter of `model`'s names."""
    generations = [(g.output_ids, g.output_logprobs)
                   for g in client.generate_batch(PROMPTS, {**GREEDY, "max_new_tokens": 8})]
    wait_idle(client)
    if "get_weights_by_name" in WITHOUT:
        return generations, None
    weights = {name: client.get_weights_by_name(name, truncate_size=tensor.numel()) for name, tensor in
               hf_tensors(model)}
    return generations, weights


def test_a_flattened_bucket_of_mixed_dtypes_loads_bitwise_as_the_per_tensor_update(
        client, base, checkpoint, learner_under_torchrun, weight_group, restore):
    new = perturbed(base, seed=6)
    # the norms travel as bfloat16 (so the bucket mixes 4- and 2-byte tensors); the server casts them to float32
    low = {name for name, _ in hf_tensors(new) if name.endswith("norm.weight")}
    with torch.no_grad():
        for name, parameter in new.named_parameters():
            if name in low:
                parameter.copy_(parameter.bfloat16().float())
    tensors = [(n, t.bfloat16() if n in low else t) for n, t in hf_tensors(new)]
    assert len(low) >= 4 and len(tensors) > len(low)
    send_over(client, weight_group, tensors, "per-tensor-6", flattened=False)
    assert_serves(client, new, "per-tensor-6")
    per_tensor = served_state(client, new)
    client.update_weights_from_disk(checkpoint, weight_version="between")
    assert served_state(client, new) != per_tensor  # negative control: the base weights serve otherwise
    send_over(client, weight_group, tensors, "flat-6", flattened=True)
    assert served_state(client, new) == per_tensor
    assert_serves(client, new, "flat-6")


def test_a_flattened_bucket_with_an_unaligned_offset_or_a_negative_dim_is_refused_before_receiving(
        client, base, weight_group, restore):
    version = client.get_weight_version()
    client.begin_weight_update()
    unaligned = {"names": ["model.norm.weight", "model.layers.0.input_layernorm.weight"],
                 "dtypes": ["bfloat16", "float32"], "shapes": [[3], [64]]}
    for fields, named in ((unaligned, r"input_layernorm\.weight.*offset 6"),
                          ({"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[-64]]},
                           r"shapes\[0\]|[Nn]egative dimension")):  # ours refuses it in any load_format
        with pytest.raises(EngineError, match=named) as error:  # nothing is broadcast: the server must not wait
            client.update_weights_from_distributed(**fields, group_name=weight_group[0], weight_version="never",
                                                   load_format=LOAD_FORMAT)
        assert error.value.status == 400
    client.end_weight_update()
    assert_serves(client, base, version)


@ours_only
def test_a_flattened_bucket_with_a_wrong_size_changes_nothing(client, base, learner_under_torchrun, weight_group):
    version = client.get_weight_version()
    tensors = hf_tensors(perturbed(base, seed=7))
    for wrong, named in (("model.norm.weight", r"model\.norm\.weight.*shape"),
                         ("model.embed_tokens.weight", r"model\.embed_tokens\.weight.*shape")):
        sent = [(n, torch.zeros(3) if n == wrong else t) for n, t in tensors]  # received whole, then refused
        with pytest.raises(EngineError, match=named) as error:
            send_over(client, weight_group, sent, "bad", flattened=True)
        assert error.value.status == 400
        client.end_weight_update()
    assert_serves(client, base, version)


def test_updates_need_a_session_and_change_nothing_without_one(client, base, weight_group):
    version = client.get_weight_version()
    tensors = hf_tensors(perturbed(base, seed=4))
    with pytest.raises(EngineError, match="begin_weight_update") as error:
        client.update_weights_from_distributed(names=[n for n, _ in tensors], dtypes=["float32"] * len(tensors),
                                               shapes=[list(t.shape) for _, t in tensors],
                                               group_name=weight_group[0], weight_version="never")
    assert error.value.status == 400
    if not EXTERNAL_URL:
        with pytest.raises(EngineError, match="begin_weight_update") as error:
            client.update_weights_from_tensor(tensors, weight_version="never")
        assert error.value.status == 400
        client.begin_weight_update()
        client.begin_weight_update()  # idempotent: one end closes the session
        client.end_weight_update()
        with pytest.raises(EngineError, match="no weight update session") as error:
            client.end_weight_update()
        assert error.value.status == 400
    assert_serves(client, base, version)


@ours_only
def test_a_bad_update_changes_nothing(client, base):
    version = client.get_weight_version()
    tensors = hf_tensors(perturbed(base, seed=5))
    client.begin_weight_update()
    with pytest.raises(EngineError, match="model.no_such.weight"):
        client.update_weights_from_tensor([*tensors, ("model.no_such.weight", torch.zeros(3))], weight_version="bad")
    with pytest.raises(EngineError, match="model.norm.weight.*shape"):
        client.update_weights_from_tensor([*tensors[:-1], ("model.norm.weight", torch.zeros(3))], weight_version="bad")
    client.end_weight_update()
    assert_serves(client, base, version)


# --- auth and bind ----------------------------------------------------------------------------------------

def test_admin_endpoints_refuse_a_missing_or_wrong_token(server, client, base, checkpoint, tmp_path, token):
    if not token:
        pytest.skip("the external server runs without a token")
    version = client.get_weight_version()
    perturbed(base, seed=6).save_pretrained(tmp_path)
    for intruder in (EngineClient(server.url), EngineClient(server.url, token=token + "x")):
        calls = [lambda c: c.update_weights_from_disk(str(tmp_path), weight_version="intruder"),
                 lambda c: c.begin_weight_update(), lambda c: c.pause_generation("abort"),
                 lambda c: c.get_weights_by_name("model.norm.weight"), lambda c: c.abort_request(abort_all=True)]
        for call in calls:
            with pytest.raises(EngineError) as error:
                call(intruder)
            assert error.value.status in (401, 403), error.value
        assert intruder.health()
    assert_serves(client, base, version)  # nothing changed, nothing paused
    if not EXTERNAL_URL:  # ours: 401 without a token, 403 with a wrong one; /generate is open on loopback
        with pytest.raises(EngineError, match="HTTP 401"):
            EngineClient(server.url).begin_weight_update()
        with pytest.raises(EngineError, match="HTTP 403"):
            EngineClient(server.url, token="nope").begin_weight_update()
        assert_greedy(base, EngineClient(server.url).generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 3}))


@ours_only
def test_generate_needs_the_token_when_bound_beyond_loopback(base):
    from megatron_rl.rollout.cpu_server import Server, make_http_server
    from megatron_rl.rollout.hf_engine import HFGenerator

    app = Server(HFGenerator(base, [1]), "in-process", token="t0k", loopback=False)
    http = make_http_server(app, "127.0.0.1", 0)
    app.scheduler.start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        with pytest.raises(EngineError, match="HTTP 401"):
            EngineClient(url).generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2})
        with pytest.raises(EngineError, match="HTTP 403"):
            EngineClient(url, token="wrong").get_weight_version()
        assert_greedy(base, EngineClient(url, token="t0k").generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2}))
        assert EngineClient(url).health_generate()
    finally:
        http.shutdown()
        app.close()
        http.server_close()


@ours_only
def test_the_server_binds_loopback_and_refuses_to_start_wrongly(server, checkpoint, monkeypatch, capsys):
    from megatron_rl.rollout.cpu_server import EXIT_USAGE, serve

    assert build_parser().parse_args(["serve", "--model-path", checkpoint]).host == "127.0.0.1"
    assert re.search(r"on http://127\.0\.0\.1:\d+", server.log_text())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # this machine's address beyond loopback
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
    except OSError:  # no route beyond loopback: nothing to try
        address = "127.0.0.1"
    if not address.startswith("127."):
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()
    monkeypatch.delenv("MEGATRON_RL_SERVE_TOKEN", raising=False)
    assert serve(checkpoint) == EXIT_USAGE
    assert "no token" in capsys.readouterr().err
    assert serve(checkpoint, host="0.0.0.0", no_token=True) == EXIT_USAGE
    assert "loopback" in capsys.readouterr().err
    assert serve("/no/such/checkpoint", token="t") == EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err
    assert serve(checkpoint, token="t", port=int(server.url.rsplit(":", 1)[1])) == EXIT_USAGE  # taken: the server's
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# --- pause, continue, abort -------------------------------------------------------------------------------

def test_pause_in_place_holds_requests_until_continue(client, base, restore):
    client.pause_generation("in_place")
    waiting = in_thread(client.generate, PROMPTS[2], {**GREEDY, "max_new_tokens": 6})
    time.sleep(1.0)
    assert not waiting.done()
    client.continue_generation()
    generation = waiting()
    assert generation.finish_reason == {"type": "length", "length": 6}
    assert_greedy(base, generation)


def test_pause_abort_aborts_in_flight_and_holds_new_requests(client, base, restore):
    running = in_thread(client.generate, PROMPTS[1], {**GREEDY, "max_new_tokens": LONG})
    time.sleep(0.3)
    client.pause_generation("abort")
    aborted = running()
    assert aborted.finish_reason["type"] == "abort"
    assert len(aborted.output_ids) < LONG
    waiting = in_thread(client.generate, PROMPTS[0], {**GREEDY, "max_new_tokens": 4})
    time.sleep(1.0)
    assert not waiting.done()
    client.continue_generation()
    assert_greedy(base, waiting())


def test_abort_request_by_rid_and_all(client, base, restore):
    client.pause_generation("in_place")  # both queue up, then start as one batch
    victim = in_thread(client.generate, PROMPTS[1], {**GREEDY, "max_new_tokens": LONG}, rid="victim")
    bystander = in_thread(client.generate, PROMPTS[3], {**GREEDY, "max_new_tokens": 40}, rid="bystander")
    time.sleep(0.5)
    client.continue_generation()
    client.abort_request(rid="victim")
    aborted = victim()
    assert aborted.rid == "victim" and aborted.finish_reason["type"] == "abort"
    assert len(aborted.output_ids) < LONG
    survivor = bystander()  # unharmed: in our server it started over after its batch stopped
    assert survivor.finish_reason == {"type": "length", "length": 40}
    assert_greedy(base, survivor)
    many = [in_thread(client.generate, p, {**GREEDY, "max_new_tokens": LONG}) for p in PROMPTS[:2]]
    time.sleep(0.3)
    client.abort_request(abort_all=True)
    assert all(join().finish_reason["type"] == "abort" for join in many)


def test_weights_updated_during_an_in_place_pause_apply_from_the_next_token(client, base, checkpoint, tmp_path,
                                                                           restore):
    """SGLang meets this with --disable-overlap-schedule only: with overlap scheduling (its default) the token in
    flight at the pause comes from the old weights but is counted in the new version's span."""
    new = perturbed(base, seed=7, scale=0.3)
    new.save_pretrained(tmp_path)
    before = client.get_weight_version()
    running = in_thread(client.generate, PROMPTS[3], {**GREEDY, "max_new_tokens": LONG})
    time.sleep(0.3)
    client.pause_generation("in_place")
    client.begin_weight_update()
    client.update_weights_from_disk(str(tmp_path), weight_version="mid", flush_cache=False)  # requests are held
    client.end_weight_update()
    time.sleep(0.2)
    assert not running.done()  # still held
    client.continue_generation()
    generation = running()
    assert generation.finish_reason == {"type": "length", "length": LONG}
    (old, start, switch), (mid, switch_again, end) = generation.weight_versions
    assert (old, mid, start, end) == (before, "mid", 0, LONG) and 0 < switch == switch_again < LONG
    assert generation.weight_version == "mid"
    prefix = Generation(generation.prompt_ids, generation.output_ids[:switch], generation.output_logprobs[:switch],
                        {}, old)
    assert_greedy(base, prefix, tol=LONG_TOL)
    # after the switch: the new weights over the old weights' KV cache of the prompt and the first switch - 1 tokens
    # (token switch - 1 is the first input the new weights process)
    context = generation.prompt_ids + generation.output_ids[:switch - 1]
    with torch.no_grad():
        cache = base(torch.tensor([context]), use_cache=True).past_key_values
        logits = new(torch.tensor([generation.output_ids[switch - 1:-1]]), past_key_values=cache).logits[0].float()
    after = torch.tensor(generation.output_ids[switch:])
    expected = torch.log_softmax(logits, -1)
    assert after.tolist() == expected.argmax(-1).tolist()
    served = torch.tensor(generation.output_logprobs[switch:])
    torch.testing.assert_close(served, expected.gather(-1, after[:, None]).squeeze(-1), rtol=0, atol=LONG_TOL)
    for model in (base, new):  # negative controls: neither model alone explains the tokens after the switch
        alone = teacher_forced(model, generation.prompt_ids, generation.output_ids)[switch:]
        assert (served - alone.gather(-1, after[:, None]).squeeze(-1)).abs().max() > 1e-3


# --- bad requests -------------------------------------------------------------------------------------------

# (endpoint, body, what the message names, what real SGLang 0.5.23 does instead: None when it answers the same)
BAD_REQUESTS = [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1.0}}, "temperature", None),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p", None),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "x"}}, "max_new_tokens",
     "400 without the field's name"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temprature": 1.0}}, "temprature", None),
    ("/generate", {"input_ids": [1, 100000]}, "input_ids", "the server dies (IndexError in its embedding)"),
    ("/generate", {"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params", "500"),
    ("/generate", {"input_ids": [1], "rid": ["a", "b"]}, "rid", "500"),
    ("/generate", {"input_ids": [1], "stream": True}, "stream", "it streams"),
    ("/generate", {"input_ids": [1], "return_hidden_states": True}, "return_hidden_states", "it returns them"),
    ("/pause_generation", {"mode": "sleep"}, "mode", None),
    ("/update_weights_from_disk", {}, "model_path", None),
    ("/update_weights_from_disk", {"model_path": "/no/such/dir"}, "model_path", "400 without the field's name"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1"}, "master_port", None),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                    "world_size": 2, "backend": "nccl"}, "backend",
     "its scheduler blocks in the rendezvous"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"]}, "shapes", None),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                          "load_format": "zipped"}, "load_format",
     "400 for want of a session, without the field's name (within one it ignores an unknown load_format)"),
    ("/get_weights_by_name", {"name": "model.no_such.weight"}, "model.no_such.weight",
     "400 without the name (\"Get parameter by name failed\")"),
    ("/destroy_weights_update_group", {"group_name": "no-such-group"}, "no-such-group",
     "400 without the name (\"The group to be destroyed does not exist.\")"),
]


@pytest.mark.parametrize("endpoint, body, named, sglang", BAD_REQUESTS,
                         ids=[f"{e}-{n}" for e, _, n, _ in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(server, token, endpoint, body, named, sglang):
    if sglang and EXTERNAL_URL:
        pytest.skip(f"real SGLang 0.5.23: {sglang}")
    status, answer = raw_post(server.url, endpoint, json.dumps(body).encode(), token)
    assert status == 400, answer
    assert named in json.dumps(answer), answer


@ours_only
def test_a_body_that_is_not_json_is_400(server, token):
    for data in (b"{not json", b"[1, 2]", base64.b64encode(b"\x80\x81")):
        status, answer = raw_post(server.url, "/generate", data, token)
        assert status == 400 and "JSON" in answer["message"], answer


# --- shutdown (last: it stops the module's server) ---------------------------------------------------------

@ours_only
def test_sigterm_answers_in_flight_requests_and_exits_cleanly(server, client):
    running = in_thread(client.generate, PROMPTS[1], {**GREEDY, "max_new_tokens": LONG})
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log_text()
    try:
        assert running(timeout=30).finish_reason["type"] == "abort"
    except EngineError as error:  # the answer may lose the race with the process exit
        assert error.status is None
    assert "stopped" in server.log_text()

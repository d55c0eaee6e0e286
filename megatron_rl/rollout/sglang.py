"""Real SGLang servers as rollout engines (GPU nodes).

`sglang_server_command` starts one SGLang 0.5.23 server per rollout.engines entry of kind 'sglang'
(its own tensor-parallel size). The engines speak the same HTTP contract as `megatron-rl serve`;
weight updates go to each server directly (sglang-router answers 404 for them). SGLang reads its
API key from the command line (`--api-key`); the token is the one the trainer uses for every
engine. `--disable-overlap-schedule`: with SGLang's default overlap scheduling the first token
labelled with a new weight version was computed by the old weights (measured on 0.5.23), and the
buffer's staleness accounting needs exact labels.
"""

import sys

from megatron_rl.config.sections import EngineSpec


def sglang_server_command(spec: EngineSpec, model_path: str, token: str) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", spec.host,
            "--port", str(spec.port), "--tp-size", str(spec.tp), "--api-key", token,
            "--disable-overlap-schedule"]

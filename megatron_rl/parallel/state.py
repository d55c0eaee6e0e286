"""torch.distributed and Megatron-Core's parallel state, from a ParallelConfig.

    launch = initialize_parallel(cfg.parallel, seed=cfg.data.seed)   # under torchrun, srun or plain python
    ...
    destroy_parallel()

Who started the processes is read from the environment (`launch_from_env`), first match wins:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun's own store: env://);
- Slurm (srun, one task per rank): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR from the
  environment or the first host of SLURM_JOB_NODELIST / SLURM_NODELIST (compressed hostlists such
  as `gpu[01-03,07]` are expanded here); MASTER_PORT from the environment or DEFAULT_MASTER_PORT;
- neither: one process (rank 0 of 1) on 127.0.0.1, MASTER_PORT or a free port.
"""

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from megatron_rl.config import ParallelConfig
from megatron_rl.platform import bind_local_device, distributed_backend, ensure_platform
from megatron_rl.ports import free_port

DEFAULT_MASTER_PORT = 29500
PIPELINE_SEED_STRIDE = 100  # Megatron-LM's convention: stage p seeds with seed + 100 * p


def megatron_parallel_sizes(parallel: ParallelConfig) -> dict[str, int | None]:
    """The layout in Megatron-Core's names (initialize_model_parallel and TransformerConfig)."""
    return {
        "tensor_model_parallel_size": parallel.tp,
        "pipeline_model_parallel_size": parallel.pp,
        "virtual_pipeline_model_parallel_size": parallel.vpp,
        "context_parallel_size": parallel.cp,
        "expert_model_parallel_size": parallel.ep,
        "expert_tensor_parallel_size": parallel.etp,
    }


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher described it."""

    launcher: Literal["torchrun", "slurm", "single"]
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_from_env(env: Mapping[str, str]) -> Launch:
    """Parse a torchrun, Slurm or single-process environment (see the module docstring)."""
    if "RANK" in env:
        return Launch("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                      _required(env, "MASTER_ADDR"), _int(env, "MASTER_PORT"))
    if "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and not nodelist:
            raise ValueError("under Slurm, MASTER_ADDR or SLURM_JOB_NODELIST / SLURM_NODELIST must be set")
        return Launch("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", 0),
                      env.get("MASTER_ADDR") or first_host(nodelist),
                      _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT))
    return Launch("single", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                  _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port())


def _required(env: Mapping[str, str], name: str) -> str:
    if not env.get(name):
        raise ValueError(f"environment variable {name} is not set (the launcher sets it)")
    return env[name]


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env and default is not None:
        return default
    value = _required(env, name)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed hostlist -> host names: "n[01-03,07],gpu[1-2]-ib" ->
    [n01, n02, n03, n07, gpu1-ib, gpu2-ib]. A range keeps the zero padding of its lower bound;
    several bracket groups in one name expand as a product."""
    hosts = []
    for name in _split_outside_brackets(hostlist):
        hosts.extend(_expand_name(name))
    return hosts


def first_host(hostlist: str) -> str:
    return expand_hostlist(hostlist)[0]


def _split_outside_brackets(hostlist: str) -> list[str]:
    names, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"malformed hostlist {hostlist!r}: unbalanced or nested brackets")
        if char == "," and depth == 0:
            names.append(hostlist[start:index])
            start = index + 1
    names.append(hostlist[start:])
    if depth or not all(names):
        raise ValueError(f"malformed hostlist {hostlist!r}")
    return names


def _expand_name(name: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", name)
    if match is None:
        if "[" in name or "]" in name:
            raise ValueError(f"malformed host name {name!r}")
        return [name]
    prefix, ranges, rest = match.groups()
    return [prefix + value + tail for value in _expand_ranges(ranges) for tail in _expand_name(rest)]


def _expand_ranges(ranges: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if bounds is None:
            raise ValueError(f"malformed hostlist range {part!r} in [{ranges}]")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        if int(high) < int(low):
            raise ValueError(f"hostlist range {part!r} is decreasing")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def initialize_parallel(parallel: ParallelConfig, backend: str | None = None, seed: int = 1234) -> Launch:
    """Start torch.distributed (unless already started) and Megatron-Core's model-parallel groups.

    backend: None picks nccl with a GPU, gloo without. Seeds python, numpy, torch and Megatron's RNG
    tracker with seed + 100 * pipeline rank (so stages do not initialise their layers alike).
    Raises ValueError when the number of processes is not parallel.world_size.
    """
    launch = launch_from_env(os.environ)
    world_size = dist.get_world_size() if dist.is_initialized() else launch.world_size
    if world_size != parallel.world_size:
        raise ValueError(f"{launch.launcher} started {world_size} processes (WORLD_SIZE={world_size}) but "
                         f"parallel.world_size is {parallel.world_size}; launch {parallel.world_size} "
                         f"processes or set parallel.world_size={world_size}")
    ensure_platform()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        bind_local_device(launch.local_rank)
        init_method = ("env://" if launch.launcher == "torchrun"
                       else f"tcp://{launch.master_addr}:{launch.master_port}")
        dist.init_process_group(backend or distributed_backend(), init_method=init_method,
                                rank=launch.rank, world_size=launch.world_size)
    parallel_state.initialize_model_parallel(**megatron_parallel_sizes(parallel))
    stage_seed = seed + PIPELINE_SEED_STRIDE * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    return launch


def destroy_parallel() -> None:
    """Tear down Megatron-Core's groups and the default process group (safe to call twice)."""
    ensure_platform()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""The hardware the learner runs on: the only package of megatron_rl that calls torch.cuda.

    ensure_platform()        # before the first Megatron-Core import: CPU patches when there is no GPU
    distributed_backend()    # "nccl" with a GPU, "gloo" without
    local_device()           # where this process's tensors live

Without a GPU, `ensure_platform()` applies every patch of `megatron_rl.platform.cpu` except those
named in the environment variable MEGATRON_RL_DISABLE_CPU_PATCHES (comma-separated; for ablation).
With a GPU it applies nothing.
"""

import os

import torch

from megatron_rl.platform.cpu import apply_cpu_patches, parse_disabled

DISABLE_PATCHES_ENV = "MEGATRON_RL_DISABLE_CPU_PATCHES"


def gpu_available() -> bool:
    return torch.cuda.is_available()


def distributed_backend() -> str:
    return "nccl" if gpu_available() else "gloo"


def bind_local_device(local_rank: int) -> None:
    """Make GPU `local_rank` this process's current device (no-op without a GPU)."""
    if gpu_available():
        torch.cuda.set_device(local_rank)


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if gpu_available() else torch.device("cpu")


def ensure_platform() -> tuple[str, ...]:
    """Prepare Megatron-Core for this machine; return the names of the CPU patches in effect."""
    if gpu_available():
        return ()
    return apply_cpu_patches(parse_disabled(os.environ.get(DISABLE_PATCHES_ENV, "")))


__all__ = ["DISABLE_PATCHES_ENV", "bind_local_device", "distributed_backend", "ensure_platform",
           "gpu_available", "local_device"]

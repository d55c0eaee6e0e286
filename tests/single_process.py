"""Megatron as one plain process in tests, also when pytest itself runs under torchrun or in a Slurm job."""

import os
from contextlib import contextmanager

import pytest

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def plain_process_env(**updates: str) -> dict[str, str]:
    """os.environ without a launcher's or Slurm's variables, plus `updates`: for a subprocess of one rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return {**env, **updates}


@contextmanager
def single_process_megatron(seed: int):
    """Megatron's parallel state on a gloo world of this one process, torn down on exit."""
    from megatron_rl.config.sections import ParallelConfig
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    with pytest.MonkeyPatch.context() as env:
        for variable in LAUNCHER_VARIABLES:
            env.delenv(variable, raising=False)
        initialize_parallel(ParallelConfig(), seed=seed)
        try:
            yield
        finally:
            destroy_parallel()

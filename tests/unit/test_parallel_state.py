"""Launch-environment parsing and Slurm hostlists of megatron_rl.parallel.state (no process group)."""

import pytest

from megatron_rl.config import ParallelConfig
from megatron_rl.parallel.state import (
    DEFAULT_MASTER_PORT,
    Launch,
    expand_hostlist,
    first_host,
    initialize_parallel,
    launch_from_env,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-09,12]"}


def test_torchrun():
    assert launch_from_env(TORCHRUN) == Launch("torchrun", 3, 8, 1, "10.0.0.1", 29400)


def test_torchrun_wins_over_slurm():
    """torchrun started by srun (one task per node): torchrun's ranks are the process ranks."""
    assert launch_from_env({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_slurm_master_is_the_first_host_of_the_job():
    assert launch_from_env(SLURM) == Launch("slurm", 5, 8, 1, "gpu07", DEFAULT_MASTER_PORT)


@pytest.mark.parametrize(("extra", "addr", "port"), [
    ({"MASTER_PORT": "1234"}, "gpu07", 1234),
    ({"MASTER_ADDR": "head"}, "head", DEFAULT_MASTER_PORT),
])
def test_slurm_master_from_the_environment(extra, addr, port):
    launch = launch_from_env({**SLURM, **extra})
    assert (launch.master_addr, launch.master_port) == (addr, port)


def test_slurm_nodelist_fallback():
    env = {**SLURM, "SLURM_NODELIST": "cpu-3"}
    del env["SLURM_JOB_NODELIST"]
    assert launch_from_env(env).master_addr == "cpu-3"


def test_single_process():
    launch = launch_from_env({})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("single", 0, 1, 0)
    assert launch.master_addr == "127.0.0.1" and 0 < launch.master_port < 65536
    assert launch_from_env({"MASTER_PORT": "4321"}).master_port == 4321


@pytest.mark.parametrize(("env", "message"), [
    ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
    ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE must be an integer, got 'eight'"),
    ({key: value for key, value in SLURM.items() if key != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
    ({**SLURM, "SLURM_JOB_NODELIST": "gpu[07-09"}, "malformed hostlist"),
])
def test_bad_environments_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        launch_from_env(env)


def test_world_size_must_match_the_config(monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"torchrun started 8 processes .* parallel.world_size is 2"):
        initialize_parallel(ParallelConfig(tp=2, world_size=2))


@pytest.mark.parametrize(("hostlist", "hosts"), [
    ("node01", ["node01"]),
    ("a,b-2", ["a", "b-2"]),
    ("n[01-03,07]", ["n01", "n02", "n03", "n07"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("[5]", ["5"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    assert first_host(hostlist) == hosts[0]


@pytest.mark.parametrize("hostlist", ["", "n[01-03", "n01-03]", "n[[1]]", "n[03-01]", "n[a-b]", "a,,b", "n[]"])
def test_malformed_hostlists_are_refused(hostlist):
    with pytest.raises(ValueError):
        expand_hostlist(hostlist)

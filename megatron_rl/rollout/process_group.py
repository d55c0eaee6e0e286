"""A torch.distributed process group outside the default world, for pushing weights to engines.

A learner already belongs to the default group of its torchrun ranks; a rollout engine belongs to
none (our CPU server) or to its own tensor-parallel world (SGLang). The weight-update group joins
one learner rank (rank 0) with every engine rank (ranks 1..world_size-1, engine i's TP ranks at
`rank_offset + tp_rank`), without touching either default group.

It is built the way SGLang 0.5.x builds its weight-update group (its `init_custom_process_group`,
itself taken from PyTorch's `init_process_group`): a TCPStore at `init_method` (`tcp://host:port`,
hosted by rank 0), a `PrefixStore(group_name, store)` so several
groups can share a port's store without key clashes, then `_new_process_group_helper` with an
empty global-rank list (the way the default group itself is made) and the identity map
group rank -> "global" rank, so `dist.broadcast(t, src=0, group=pg)` names rank 0 of this group.
Because the construction is the same, either side may be ours or SGLang's.

backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors); the caller chooses, nothing here falls
back from one to the other. Give every new group a fresh port: rank 0's store of a destroyed group
may still hold the old one for a moment.
"""

import urllib.parse
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

BACKENDS = ("gloo", "nccl")


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta = timedelta(minutes=30)) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the group `group_name` of `world_size` processes.

    Blocks until all `world_size` processes have called it (or `timeout` passes). Raises
    ValueError for a bad argument, and whatever the rendezvous raises (RuntimeError /
    DistNetworkError) when the peers do not show up.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists in this process")
    store = _tcp_store(init_method, rank, world_size, timeout)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _tcp_store(init_method: str, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The rendezvous store at tcp://host:port, hosted by rank 0.

    Made directly rather than through c10d.rendezvous: under torchrun (TORCHELASTIC_USE_AGENT_STORE=True)
    rendezvous makes rank 0 a client of the launcher's store instead of the host of this one, and then no
    process listens at host:port. The wire protocol is the same, so SGLang's side (which joins through
    rendezvous as a client) connects to it as before."""
    parsed = urllib.parse.urlsplit(init_method)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise ValueError(f"init_method must look like tcp://host:port, got {init_method!r}")
    return dist.TCPStore(parsed.hostname, parsed.port, world_size, is_master=rank == 0, timeout=timeout)


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Tear down a group made by init_custom_process_group; its name may then be reused."""
    dist.destroy_process_group(group)

"""Full single-rank tensors from the Megatron shards of every rank, one parameter at a time.

    for name, tensor in full_parameters(chunks):   # on EVERY rank, to the end; only rank 0 gets items
        push_to_rollout_engines(name, tensor)       # name: the single-rank Megatron name

The inverse of full_weights.load_full_state: rank 0 receives (name, full tensor) for every
parameter of the single-rank model, each once, in that model's named_parameters order. Other ranks
yield nothing; they send their shards while iterating, so every rank must iterate to the end (the
same plan on every rank; a rank that stops early leaves rank 0 waiting for its shards).

Plan (computed alike on every rank from one all_gather_object of every rank's parameter list):
- each local parameter is shard `index` of `count` of the full parameter `full_name(...)`
  (pipeline layer numbers and expert-parallel expert indices mapped): for a tensor-parallel weight,
  index / count = the TP rank / size, or the expert-TP rank / size for expert weights; 0 / 1 for a
  replicated one. The last stage's copy of tied word embeddings (its output_layer.weight) is not a
  parameter of the single-rank model and is not sent.
- shard `index` of a full parameter is read from the lowest global rank that holds it, so data-,
  context- and expert-data-parallel replicas are read once (Megatron's rank order puts rank 0 of
  those groups first) and rank 0's own copy is used whenever it has one.
- order: named_parameters walks modules in registration order and ModuleLists (layers, experts)
  by index. A name's sort key has, per dotted part, the number for a numeric part and otherwise
  the part's position among its siblings; the sibling order (e.g. embedding, decoder,
  output_layer) is merged from every rank's own named_parameters order, since stages hold only
  some of the siblings.

Wire: per full parameter, in that order, each reading rank other than 0 sends its shard (the
parameter's storage, no copy) to rank 0 with a point-to-point send over the world group; rank 0
receives the shards into buffers of their shape and dtype on its parameters' device, merges them
and yields. At most one full parameter and its shards are in flight on any rank. Tensors that
rank 0 holds whole are yielded as detached views of its live parameters, not copies: clone what
you keep past the next optimizer step. Device-agnostic (gloo on CPU, nccl on GPU).

Merge (inverse of full_weights.shard_of): the full tensor is cut along partition_dim into
count * stride equal pieces and shard r holds pieces r, r + count, ..., so full piece k is piece
k // count of shard k % count (stride 2: SwiGLU's fc1, each rank holding [gate_r; up_r]).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model

from megatron_rl.learner.full_weights import full_name, tensor_parallel_place

OUTPUT_LAYER = "output_layer.weight"


@dataclass(frozen=True)
class Shard:
    """What one local parameter is: shard `index` of `count` of the full parameter `name`."""

    name: str
    index: int
    count: int
    dim: int
    stride: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def full_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(single-rank name, full tensor) for every parameter, on rank 0; collective (module docstring)."""
    local = local_shards(chunks)
    everyone: list[list[Shard]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, [shard for shard, _ in local])
    rank = dist.get_rank()
    for name, readers in read_plan(everyone):
        if rank == 0:
            yield name, _receive_full(readers, everyone, local)
            continue
        for source, position in readers:
            if source == rank:
                dist.send(local[position][1], dst=0)


def _receive_full(readers: list[tuple[int, int]], everyone: list[list[Shard]],
                  local: list[tuple[Shard, torch.Tensor]]) -> torch.Tensor:
    """On rank 0: one full parameter from the shards at `readers`, its own ones included."""
    pieces, pending = [], []
    for source, position in readers:
        if source == 0:
            pieces.append(local[position][1])
            continue
        shard = everyone[source][position]
        pieces.append(torch.empty(shard.shape, dtype=shard.dtype, device=local[0][1].device))
        pending.append(dist.irecv(pieces[-1], src=source))
    for work in pending:
        work.wait()
    first = everyone[readers[0][0]][readers[0][1]]
    return merge_shards(pieces, first.dim, first.stride)


def local_shards(chunks: list[torch.nn.Module]) -> list[tuple[Shard, torch.Tensor]]:
    """This rank's parameters (chunks bare or DDP-wrapped), tied embedding copies left out, in
    named_parameters order, each with what it is a shard of."""
    shards = []
    for chunk in unwrap_model(list(chunks)):
        single_rank_names = () if chunk.share_embeddings_and_output_weights else (OUTPUT_LAYER,)
        for local_name, param in chunk.named_parameters():
            name = full_name(chunk, local_name, single_rank_names)
            if local_name == OUTPUT_LAYER and name != OUTPUT_LAYER:
                continue  # the last stage's copy of the tied word embeddings
            index, count = tensor_parallel_place(param)
            shards.append((Shard(name, index, count, getattr(param, "partition_dim", 0),
                                 getattr(param, "partition_stride", 1), tuple(param.shape), param.dtype),
                           param.detach()))
    return shards


def read_plan(everyone: list[list[Shard]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Per full parameter, in single-rank order: the (rank, position in that rank's list) to read
    each shard index from, the lowest rank holding it. Raises if some shard is on no rank."""
    readers: dict[str, dict[int, tuple[int, int]]] = {}
    counts: dict[str, int] = {}
    for rank, shards in enumerate(everyone):
        for position, shard in enumerate(shards):
            readers.setdefault(shard.name, {}).setdefault(shard.index, (rank, position))
            counts[shard.name] = shard.count
    plan = []
    for name in single_rank_order([[shard.name for shard in shards] for shards in everyone]):
        missing = sorted(set(range(counts[name])) - set(readers[name]))
        if missing:
            raise RuntimeError(f"parameter {name}: shards {missing} of {counts[name]} are held by no rank")
        plan.append((name, [readers[name][index] for index in range(counts[name])]))
    return plan


def single_rank_order(names_per_rank: list[list[str]]) -> list[str]:
    """Every name once, in the single-rank model's named_parameters order (module docstring)."""
    siblings: dict[tuple[str, ...], list[str]] = {}  # parent, numbers as "#" -> its non-numeric children
    for names in names_per_rank:
        seen: dict[tuple[str, ...], list[str]] = {}
        for name in names:
            parts = name.split(".")
            for depth, part in enumerate(parts):
                if not part.isdigit() and part not in (children := seen.setdefault(_parent(parts, depth), [])):
                    children.append(part)
        for parent, children in seen.items():
            _merge_order(siblings.setdefault(parent, []), children)

    def key(name: str) -> tuple[int, ...]:
        parts = name.split(".")
        return tuple(int(part) if part.isdigit() else siblings[_parent(parts, depth)].index(part)
                     for depth, part in enumerate(parts))

    return sorted({name for names in names_per_rank for name in names}, key=key)


def _parent(parts: list[str], depth: int) -> tuple[str, ...]:
    return tuple("#" if part.isdigit() else part for part in parts[:depth])


def _merge_order(merged: list[str], order: list[str]) -> None:
    """Insert the items of `order` missing from `merged` right after their predecessor in `order`."""
    for position, item in enumerate(order):
        if item not in merged:
            merged.insert(merged.index(order[position - 1]) + 1 if position else 0, item)


def merge_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from its shards in rank order (module docstring, Merge); a single shard as is."""
    if len(shards) == 1:
        return shards[0]
    pieces = [shard.split(shard.shape[dim] // stride, dim=dim) for shard in shards]
    return torch.cat([pieces[k % len(shards)][k // len(shards)] for k in range(len(shards) * stride)], dim=dim)

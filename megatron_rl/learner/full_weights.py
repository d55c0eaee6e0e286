"""Between a sharded model and its full (single-rank) state dict.

A rank's chunks hold shards of the full model: pipeline stages number their layers from 0,
expert-parallel ranks their experts from 0, tensor-parallel ranks hold slices of the matrices,
and the last stage of a model with tied embeddings keeps its own copy of the word embeddings as
output_layer.weight. `full_name` maps a local parameter name to the single-rank name and
`shard_of` cuts this rank's slice out of a full tensor, so a full state dict (a single-rank
model's, or a converted checkpoint's) loads into any layout.

Experts are numbered locally in both of Megatron-Core's layer specs: the local spec's
`mlp.experts.local_experts.J.<linear>.weight` and Transformer Engine's grouped-GEMM
`mlp.experts.<linear>.weightJ` (bias likewise); J maps through the layer's local_expert_indices.
"""

import re

import torch
from megatron.core import parallel_state

GROUPED_EXPERT_PARAM = re.compile(r"(weight|bias)(\d+)")  # TE's grouped GEMM: one tensor per local expert


def full_name(chunk: torch.nn.Module, local_name: str, full_names) -> str:
    """The single-rank name of parameter `local_name` of `chunk` (a GPTModel)."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if parts[3:6] == ["mlp", "experts", "local_experts"]:
            parts[6] = str(layer.mlp.local_expert_indices[int(parts[6])])
        elif parts[3:5] == ["mlp", "experts"] and (grouped := GROUPED_EXPERT_PARAM.fullmatch(parts[-1])):
            parts[-1] = grouped[1] + str(layer.mlp.local_expert_indices[int(grouped[2])])
    name = ".".join(parts)
    if name == "output_layer.weight" and name not in full_names:
        return "embedding.word_embeddings.weight"
    return name


def tensor_parallel_place(param: torch.nn.Parameter) -> tuple[int, int]:
    """(rank, size) of the group `param` is split over: the tensor-parallel group, the expert-TP
    group for expert weights (Megatron marks them allreduce=False); (0, 1) for a whole tensor."""
    if not getattr(param, "tensor_model_parallel", False):
        return 0, 1
    if not getattr(param, "allreduce", True):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def shard_of(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's slice of a full tensor, as Megatron cuts it.

    Megatron splits dim `partition_dim` into size * stride equal pieces and gives rank r the pieces
    r, r + size, ... (stride > 1 for interleaved layouts), over `tensor_parallel_place`'s group.
    """
    rank, size = tensor_parallel_place(param)
    if size == 1:
        return full
    dim, stride = param.partition_dim, param.partition_stride
    pieces = full.split(full.shape[dim] // (size * stride), dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def shards_of(chunks, full_state: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its shard of the full tensor) for every parameter of every chunk."""
    return [(param, shard_of(full_state[full_name(chunk, name, full_state)], param))
            for chunk in chunks for name, param in chunk.named_parameters()]


@torch.no_grad()
def load_full_state(chunks, full_state: dict[str, torch.Tensor]) -> float:
    """Copy a full state dict into the sharded chunks; return the largest |change| made."""
    largest_change = 0.0
    for param, shard in shards_of(chunks, full_state):
        if param.shape != shard.shape:
            raise ValueError(f"shape mismatch: this rank's parameter {tuple(param.shape)}, its shard of the full "
                             f"tensor {tuple(shard.shape)}")
        largest_change = max(largest_change, (param - shard).abs().max().item())
        param.copy_(shard)
    return largest_change

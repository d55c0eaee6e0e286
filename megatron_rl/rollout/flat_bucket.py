"""SGLang's "flattened_bucket" wire format: a bucket of tensors travels as ONE uint8 tensor.

/update_weights_from_distributed with load_format "flattened_bucket" (SGLang 0.5.23) lists names, dtypes and
shapes as usual, but rank 0 broadcasts a single uint8 tensor of B = sum_i numel_i * itemsize_i bytes: tensor i's
bytes (tensor.flatten().view(uint8)) at byte offsets [o_i, o_i + numel_i * itemsize_i), back to back in the order
of `names`, with no padding:

    o_0 = 0,    o_{i+1} = o_i + numel_i * itemsize_i.

The receiver views each slice back with its dtype and shape, so o_i must be a multiple of itemsize_i; SGLang refuses
an unaligned offset (and a negative dimension) before it receives. Mixed dtypes are allowed. A sender therefore
orders the tensors by itemsize, largest first (`aligned_order`): itemsizes are powers of two, so every offset is a
sum of sizes of tensors with itemsize >= itemsize_i, a multiple of itemsize_i.
"""

from collections.abc import Callable, Sequence

import torch

LOAD_FORMAT = "flattened_bucket"


def byte_offsets(names: Sequence[str], dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]
                 ) -> tuple[list[int], int]:
    """(o_i for every tensor, B): the layout above; ValueError naming the first tensor whose offset is not a
    multiple of its itemsize or whose shape has a negative dimension."""
    offsets, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        if any(dim < 0 for dim in shape):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        if offset % dtype.itemsize:
            raise ValueError(f"tensor {name!r} ({str(dtype).removeprefix('torch.')}) would start at byte offset "
                             f"{offset}, not a multiple of its itemsize {dtype.itemsize} (put tensors with larger "
                             "itemsizes first)")
        offsets.append(offset)
        offset += torch.Size(shape).numel() * dtype.itemsize
    return offsets, offset


def aligned_order(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors ordered by itemsize, largest first (stable: a single-dtype bucket keeps its order)."""
    return sorted(named_tensors, key=lambda item: -item[1].element_size())


def unflatten(flat: torch.Tensor, names: Sequence[str], dtypes: Sequence[torch.dtype],
              shapes: Sequence[Sequence[int]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors inside the uint8 tensor `flat` [B], as views (no copy)."""
    offsets, total = byte_offsets(names, dtypes, shapes)
    if flat.dtype != torch.uint8 or flat.shape != (total,):
        raise ValueError(f"a flattened bucket of these tensors is uint8 [{total}], got {flat.dtype} "
                         f"{list(flat.shape)}")
    return [(name, flat[offset:offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape))
            for name, dtype, shape, offset in zip(names, dtypes, shapes, offsets, strict=True)]


def flatten(named_tensors: Sequence[tuple[str, torch.Tensor]], allocate: Callable[[int], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """(flat, views): the tensors copied once, in `aligned_order`, into the uint8 tensor flat [B] that
    `allocate(B)` gives (default: a new one on the first tensor's device); views are the copies, (name, view
    into flat), in the order sent."""
    if not named_tensors:
        raise ValueError("a flattened bucket needs at least one tensor")
    ordered = aligned_order(named_tensors)
    names = [name for name, _ in ordered]
    dtypes = [tensor.dtype for _, tensor in ordered]
    shapes = [tuple(tensor.shape) for _, tensor in ordered]
    _, total = byte_offsets(names, dtypes, shapes)
    device = ordered[0][1].device
    flat = allocate(total) if allocate else torch.empty(total, dtype=torch.uint8, device=device)
    views = unflatten(flat, names, dtypes, shapes)
    with torch.no_grad():
        for (_, view), (_, tensor) in zip(views, ordered, strict=True):
            view.copy_(tensor)
    return flat, views

"""Weights as safetensors files in a private directory, rewritten in place from push to push.

The "disk" weight-sync transport (rollout.weight_sync.transport) writes every bucket of HF-named tensors to
`<dir>/weights-<index>.safetensors` and asks each engine to /update_weights_from_disk that directory. On a tmpfs
(/dev/shm, the default `disk_dir`) that is a shared-memory handoff to the engines on this host: one copy into the
file, one copy out of it into the engine's parameters, no network.

A file is the safetensors layout, which the engines read with the safetensors library:

    [8 bytes: N, little-endian u64] [N bytes: JSON header, space-padded to a multiple of 8] [data: B bytes]
    header[name] = {"dtype": "F32" | "BF16" | ..., "shape": [...], "data_offsets": [o_i, o_i + nbytes_i]}

with the tensors back to back in rollout/flat_bucket.py's aligned order (largest itemsize first, so every o_i is a
multiple of its itemsize). Each file stays memory-mapped (torch.from_file, shared) between pushes: when the next
push's bucket has the same size the new bytes are copied into pages that are already there (a fresh file would pay
a page fault per 4 KiB first). The kept views into the mappings are the last pushed weights, for verification and
for re-syncing a restarted engine with no copy of its own.
"""

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_rl.rollout.flat_bucket import aligned_order, flatten

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
HEADER_LENGTH_BYTES = 8


def safetensors_header(named_tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """The length prefix and JSON header of a file holding `named_tensors` back to back in this order
    (ValueError naming a tensor of a dtype safetensors has no name for)."""
    header, offset = {}, 0
    for name, tensor in named_tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be written to safetensors "
                             f"(expected one of {', '.join(str(d) for d in SAFETENSORS_DTYPES)})")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class WeightFiles:
    """A private directory (mode 0700) under `parent` holding the last pushed weights as safetensors files."""

    def __init__(self, parent: str | Path):
        parent = Path(parent)
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"rollout.weight_sync.disk_dir: {str(parent)!r} is not a writable directory "
                             "(the 'disk' transport writes the weights there; /dev/shm keeps them in memory)")
        self.path = Path(tempfile.mkdtemp(prefix="megatron-rl-weights-", dir=parent))
        self._mapped: list[torch.Tensor] = []  # uint8 [file size] per file, mapped shared

    def write(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> list[list[tuple[str, torch.Tensor]]]:
        """Write bucket i to weights-<i>.safetensors (reusing its mapping when the size is unchanged) and remove
        files left from a longer push; returns per bucket the written tensors as (name, view into the file)."""
        written = []
        for index, bucket in enumerate(buckets):
            header = safetensors_header(aligned_order(bucket))

            def allocate(data_bytes: int, index: int = index, header: bytes = header) -> torch.Tensor:
                mapped = self._map(index, len(header) + data_bytes)
                mapped[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
                return mapped[len(header):]

            written.append(flatten(bucket, allocate)[1])
        for index in range(len(written), len(self._mapped)):
            self._file(index).unlink()
        del self._mapped[len(written):]
        return written

    def _file(self, index: int) -> Path:
        return self.path / f"weights-{index:05d}.safetensors"

    def _map(self, index: int, size: int) -> torch.Tensor:
        """File `index` mapped as uint8 [size]: the kept mapping if its size matches, else a new file."""
        if index < len(self._mapped) and self._mapped[index].numel() == size:
            return self._mapped[index]
        file = self._file(index)
        file.unlink(missing_ok=True)  # a new inode: views into the old mapping stay valid until dropped
        with open(file, "wb") as handle:
            handle.truncate(size)
        mapped = torch.from_file(str(file), shared=True, size=size, dtype=torch.uint8)
        if index < len(self._mapped):
            self._mapped[index] = mapped
        else:
            self._mapped.append(mapped)
        return mapped

    def close(self) -> None:
        """Unmap and remove the directory (on a tmpfs its memory is freed once no engine maps it either)."""
        self._mapped.clear()
        shutil.rmtree(self.path, ignore_errors=True)

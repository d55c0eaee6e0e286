"""Hugging Face checkpoint directories: safetensors, streamed (config.json: hf_config.read_hf_config).

    checkpoint = SafetensorsCheckpoint(path)        # lazy Mapping: name -> tensor, read on access
    for name, tensor in iter_safetensors(path): ... # every tensor once, file by file
    write_safetensors(out, named_tensors, max_shard_bytes=5 * 2**30, extra_files={"config.json": text})

Reading: `model.safetensors`, or `model.safetensors.index.json` ({"weight_map": {name: file}}) and its
shards. Only safetensors (no pickled .bin checkpoints). Files are memory-mapped; a tensor is read when
it is asked for, so a conversion holds a few tensors at a time, not the model.

Writing: shards of at most max_shard_bytes (a larger tensor gets a shard of its own), named as
transformers names them: one shard is `model.safetensors`; several are `model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {...}}). Everything
is written into a temporary sibling directory, fsynced, then renamed to `directory`: a reader sees the
whole checkpoint or none, and a failure leaves nothing behind.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rl.files import fsync_path, write_synced

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint directory, read lazily (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._file_of = _weight_map(self.directory)
        self._handles: dict[str, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{name!r} is not in the checkpoint {self.directory}")
        return self._open(self._file_of[name]).get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def files(self) -> list[str]:
        """The shard files, in the order of their first tensor in the weight map."""
        return list(dict.fromkeys(self._file_of.values()))

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.directory / file, framework="pt")
        return self._handles[file]


def iter_safetensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one shard file after another."""
    checkpoint = SafetensorsCheckpoint(directory)
    for file in checkpoint.files():
        for name in checkpoint._open(file).keys():
            yield name, checkpoint[name]


def _weight_map(directory: Path) -> dict[str, str]:
    """name -> shard file, from the index or the single file; every file checked to exist and agree."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{directory / INDEX_FILE} has no 'weight_map' {{tensor name: file}}")
    elif (directory / SINGLE_FILE).is_file():
        with safe_open(directory / SINGLE_FILE, framework="pt") as single:
            return dict.fromkeys(single.keys(), SINGLE_FILE)
    else:
        found = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else "no such directory"
        raise FileNotFoundError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
                                f"checkpoints are read); found: {found}")
    for file in dict.fromkeys(weight_map.values()):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / INDEX_FILE} names shard {file}, which does not exist")
        with safe_open(directory / file, framework="pt") as shard:
            listed = {name for name, owner in weight_map.items() if owner == file}
            if listed - set(shard.keys()):
                raise ValueError(f"{directory / INDEX_FILE} places {sorted(listed - set(shard.keys()))[:5]} in "
                                 f"{file}, which does not hold them")
    return weight_map


def write_safetensors(directory: str | os.PathLike, named_tensors: Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int, extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write a sharded safetensors checkpoint (+ `extra_files`, e.g. config.json) atomically; return its path.

    `named_tensors` is consumed once, holding at most one shard in memory. `directory` must not exist.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; write a checkpoint to a new directory")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        shards = _write_shards(staging, named_tensors, max_shard_bytes)
        _name_shards(staging, shards)
        for name, content in (extra_files or {}).items():
            write_synced(staging / name, content)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(directory.parent)
    return directory


def _write_shards(staging: Path, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int) -> list[dict[str, int]]:
    """Write shard-k.safetensors files; return each shard's {name: bytes}."""
    shards: list[dict[str, int]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, seen = 0, set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is given twice")
        seen.add(name)
        tensor = _standalone(tensor)
        if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
            shards.append(_save_shard(staging / f"shard-{len(shards)}.safetensors", pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += tensor.nbytes
    if not pending:
        raise ValueError("no tensors to write")
    shards.append(_save_shard(staging / f"shard-{len(shards)}.safetensors", pending))
    return shards


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    save_file(tensors, path, metadata={"format": "pt"})
    fsync_path(path)
    return {name: tensor.nbytes for name, tensor in tensors.items()}


def _name_shards(staging: Path, shards: list[dict[str, int]]) -> None:
    if len(shards) == 1:
        os.rename(staging / "shard-0.safetensors", staging / SINGLE_FILE)
        return
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(staging / f"shard-{index}.safetensors", staging / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(sum(shard.values()) for shard in shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_synced(staging / INDEX_FILE, json.dumps(index, indent=2).encode())


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses views that share memory)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()

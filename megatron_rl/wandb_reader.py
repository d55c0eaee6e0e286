"""Read a wandb run file (`run-<id>.wandb`) back: config, history, summary and exit code.

wandb 0.31 has no reader of its own any more (`wandb.sdk.internal.datastore` and `wandb sync
--view` are gone), so this module parses the file with wandb's own protobuf messages. The format
is private; the project pins wandb==0.31.0 and tests/unit/test_tracking.py reads real runs back.

Wire format:
  header   7 bytes: b":W&B", uint16 LE 0xBEE1, uint8 version 0
  body     LevelDB log format in 32 KiB blocks counted from the start of the file. A block holds
           chunks [crc32 uint32 LE][length uint16 LE][type uint8][payload: length bytes], with
           crc32 = zlib.crc32(payload, zlib.crc32(bytes([type]))) and type 1 FULL, 2 FIRST,
           3 MIDDLE, 4 LAST (a record split over blocks is FIRST MIDDLE* LAST). A block tail
           shorter than a chunk header is zero padding.
  records  each reassembled payload is one serialized wandb.proto.wandb_internal_pb2.Record.

Values are JSON text in the records (`value_json`); NaN and +-inf appear as NaN / Infinity /
-Infinity and read back as float("nan") / float("inf") / float("-inf").
"""

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What one run file holds. History rows keep wandb's own `_step`, `_runtime` and `_timestamp`;
    `config` is the run config without wandb's internal `_wandb` entry; `exit_code` is None when the
    run never finished (no exit record)."""

    path: Path
    run_id: str
    project: str
    name: str
    config: dict
    history: list[dict]
    summary: dict
    exit_code: int | None


def find_run_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else the one `run-*.wandb` file below the directory `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no wandb run file or directory at {path}")
    found = sorted({file.resolve() for file in path.rglob("run-*.wandb")})
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one run-*.wandb file below {path}, found {len(found)}: "
                                f"{[str(file) for file in found]}")
    return found[0]


def iter_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a run file in write order, each chunk's CRC checked."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or _HEADER.unpack_from(data) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path} is not a wandb run file: header {data[:_HEADER.size]!r}, "
                         f"expected b':W&B' 0xBEE1 version 0")
    offset, pending = _HEADER.size, None  # pending: the parts of a record split over blocks
    while offset < len(data):
        left_in_block = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER.size:
            offset += left_in_block
            continue
        if offset + _CHUNK_HEADER.size > len(data):
            raise ValueError(f"{path}: truncated chunk header at offset {offset}")
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        start = offset + _CHUNK_HEADER.size
        payload = data[start:start + length]
        if _CHUNK_HEADER.size + length > left_in_block or len(payload) != length:
            raise ValueError(f"{path}: chunk at offset {offset} of {length} bytes runs past its block or the file")
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: CRC mismatch in the chunk at offset {offset}")
        if (kind in (_FULL, _FIRST)) != (pending is None) or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise ValueError(f"{path}: chunk of type {kind} at offset {offset} out of sequence")
        offset = start + length
        if kind == _FULL:
            yield _parse(payload)
        elif kind == _LAST:
            yield _parse(b"".join([*pending, payload]))
            pending = None
        else:
            pending = [*(pending or []), payload]
    if pending is not None:
        raise ValueError(f"{path}: the file ends inside a record split over blocks")


def read_wandb_run(path: str | Path) -> WandbRun:
    """Read a run file, or the one run file below a directory (such as a Tracker's run_dir)."""
    file = find_run_file(path)
    run = WandbRun(path=file, run_id="", project="", name="", config={}, history=[], summary={}, exit_code=None)
    for record in iter_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
            _apply_config(run.config, record.run.config)
        elif kind == "config":
            _apply_config(run.config, record.config)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def _parse(payload: bytes) -> wandb_internal_pb2.Record:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def _key(item) -> str:
    """A flat key as written, or a nested one joined with dots (wandb's own flattening)."""
    return item.key or ".".join(item.nested_key)


def _apply_config(config: dict, record) -> None:
    config.update({_key(item): json.loads(item.value_json) for item in record.update})
    for item in record.remove:
        config.pop(_key(item), None)

"""New weights to every engine: HF-named full tensors -> buckets -> broadcast, versioned, verified.

Runs on the learner's rank 0, which receives the full tensors (`learner.export.full_parameters`
mapped to HF names by `models.hf_mapping.megatron_to_hf`) one at a time:

    sync = WeightSync(fleet.engines, cfg.rollout.weight_sync)
    report = sync.push(hf_named_tensors, version=step)

Wire protocol (SGLang's): each engine has its own two-rank weight-update process group (this
process is rank 0, the engine rank 1; made on first use with /init_weights_update_group), so a
restarted engine rejoins without disturbing the others. A push opens /begin_weight_update on
every engine, then for each bucket of about `bucket_mb` MiB posts
/update_weights_from_distributed (names, dtypes, shapes, weight_version) to every engine while
broadcasting the bucket over each engine's group, and closes with /end_weight_update. With `flatten`
(the default) the bucket is copied once into one uint8 tensor, its tensors ordered by itemsize so that
each starts aligned (rollout/flat_bucket.py, SGLang's load_format "flattened_bucket"), and sent in one
broadcast; without, each tensor is copied and broadcast on its own.

With `transport: disk` there are no process groups: each bucket is written into a safetensors file of a private
directory under `disk_dir` (rollout/weight_files.py, rewritten in place on every push), then every engine is asked to
/update_weights_from_disk that directory with the new weight_version. On a tmpfs this is the fast path for engines
on the learner's host; elsewhere `disk_dir` must be a filesystem the engines share.

The prefix cache: the updates themselves do not flush it (SGLang would refuse, failing the update, while it still
frees a request it has just answered). After the push each engine is asked to /flush_cache, waiting up to
`flush_wait` seconds for its requests to finish. With `flush_cache=False` (the trainer's async mode, whose engines
are always generating) there is no flush: requests in flight go on with the new weights from their next token,
and a new request may reuse prompt-prefix KV computed with the old ones (SGLang's --disable-radix-cache avoids it).

Verification ("checksum"): every engine reports its weight_version, and the first 100 values of
`verify_tensors` sampled tensors (/get_weights_by_name) must equal what was sent (in the engine's
precision); a mismatch raises WeightSyncError. SGLang 0.5.23 answers /get_weights_by_name for
Llama-family models only: for others its version is checked, with a warning.

The last pushed tensors are kept (the copies made for sending: views into the flattened buckets or into the
mapped files, the model's size in all) so that `resync` can bring a restarted engine to the current version
without a collective over the learner ranks (disk: it loads the same files). Pushes and re-syncs take turns.
"""

import logging
import random
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_rl.config.sections import WeightSyncConfig
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import Engine
from megatron_rl.rollout.flat_bucket import LOAD_FORMAT, flatten
from megatron_rl.rollout.process_group import destroy_custom_process_group, init_custom_process_group
from megatron_rl.rollout.protocol import EngineError
from megatron_rl.rollout.weight_files import WeightFiles

log = logging.getLogger(__name__)
VERIFY_VALUES = 100  # values per sampled tensor read back from an engine
LOW_PRECISIONS = (torch.bfloat16, torch.float16)


class WeightSyncError(RuntimeError):
    """An engine did not take the new weights, or holds other values than were sent."""


@dataclass
class SyncReport:
    version: int
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    verified: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes), "sync/buckets": float(self.buckets),
                "sync/gb_per_second": self.bytes / max(self.seconds, 1e-9) / 1e9, "sync/version": float(self.version)}


def buckets_of(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
               ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most bucket_bytes each (a larger tensor is a bucket alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class WeightSync:
    def __init__(self, engines: list[Engine], config: WeightSyncConfig, backend: str = "gloo",
                 master_address: str | None = None, flush_cache: bool = True):
        self.engines, self.config, self.backend, self.master_address = engines, config, backend, master_address
        self.flush_cache = flush_cache
        self.version: int | None = None
        self.latest: list[tuple[str, torch.Tensor]] = []
        self._groups: dict[int, tuple[str, dist.ProcessGroup]] = {}  # id(engine) -> (group name, group)
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(engines)), thread_name_prefix="weight-sync")
        self._lock = threading.Lock()  # a re-sync from the fleet's thread waits for a push in progress
        self._files = WeightFiles(config.disk_dir) if config.transport == "disk" else None

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             engines: list[Engine] | None = None) -> SyncReport:
        """Send the tensors (HF names) to `engines` (default: the ready ones) as weight version `version`."""
        with self._lock:
            return self._push(named_tensors, version, engines)

    def resync(self, engine: Engine) -> None:
        """Bring one (restarted) engine to the last pushed version."""
        with self._lock:
            self._forget(engine)
            if self.version is None:
                return
            if self.config.transport == "disk":  # the files still hold the last push
                self._load_files(engine, self.version)
                self._flush([engine])
                if self.config.verify == "checksum":
                    self._verify([engine], self.latest, self.version)
            else:
                self._push(self.latest, self.version, engines=[engine])

    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              engines: list[Engine] | None) -> SyncReport:
        targets = [e for e in self.engines if e.ready] if engines is None else engines
        report = SyncReport(version)
        start = time.perf_counter()
        buckets = buckets_of(named_tensors, int(self.config.bucket_mb * 2**20))
        if self.config.transport == "disk":
            self.version, self.latest = None, []  # the files are rewritten in place: no complete version until done
            sent = self._files.write(buckets)
            self._each(targets, lambda engine: self._load_files(engine, version))
        else:
            sent = self._broadcast(targets, buckets, version)
        self._flush(targets)
        report.seconds = time.perf_counter() - start
        kept = [pair for bucket in sent for pair in bucket]
        report.buckets, report.tensors = len(sent), len(kept)
        report.bytes = sum(t.numel() * t.element_size() for _, t in kept)
        if engines is None or self.config.transport == "disk":
            self.latest, self.version = kept, version
        if self.config.verify == "checksum":
            report.verified = self._verify(targets, kept, version)
        return report

    def _broadcast(self, engines: list[Engine], buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int
                   ) -> list[list[tuple[str, torch.Tensor]]]:
        """One weight-update session on every engine, each bucket sent in it; returns the sent copies per bucket."""
        self._each(engines, _begin_session)
        try:
            return [self._send_bucket(engines, bucket, version) for bucket in buckets]
        finally:
            self._each(engines, lambda engine: engine.client.end_weight_update())

    def _flush(self, engines: list[Engine]) -> None:
        """Each engine's prefix cache emptied, once its requests are done (unless pushes do not flush)."""
        if self.flush_cache:
            self._each(engines, lambda engine: engine.client.flush_cache(wait_seconds=self.config.flush_wait))

    def _load_files(self, engine: Engine, version: int) -> None:
        try:
            engine.client.update_weights_from_disk(str(self._files.path), weight_version=str(version),
                                                   flush_cache=False)
        except EngineError as exc:
            raise WeightSyncError(f"engine {engine.url} could not load the weights written to {self._files.path} "
                                  f"({exc.message}); the 'disk' transport needs rollout.weight_sync.disk_dir on a "
                                  "filesystem the engine sees (this host's /dev/shm, or a shared one)") from exc

    def _send_bucket(self, engines: list[Engine], bucket: list[tuple[str, torch.Tensor]], version: int
                     ) -> list[tuple[str, torch.Tensor]]:
        """Copy the bucket, send the copy to every engine; returns the copy (name, tensor), in the order sent."""
        if self.config.flatten:
            flat, bucket = flatten(bucket)
            broadcasts, load_format = [flat], LOAD_FORMAT
        else:
            bucket = [(name, t.detach().clone(memory_format=torch.contiguous_format)) for name, t in bucket]
            broadcasts, load_format = [tensor for _, tensor in bucket], None
        names = [name for name, _ in bucket]
        dtypes = [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket]
        shapes = [list(tensor.shape) for _, tensor in bucket]
        groups = [self._group(engine) for engine in engines]
        requests = [self._pool.submit(engine.client.update_weights_from_distributed, names=names, dtypes=dtypes,
                                      shapes=shapes, group_name=name, weight_version=str(version), flush_cache=False,
                                      load_format=load_format)
                    for engine, (name, _) in zip(engines, groups, strict=True)]
        for _, group in groups:
            for tensor in broadcasts:
                dist.broadcast(tensor, src=0, group=group)
        for request in requests:
            request.result()
        return bucket

    def _group(self, engine: Engine) -> tuple[str, dist.ProcessGroup]:
        """This engine's weight-update group, made on first use."""
        if id(engine) not in self._groups:
            name = f"megatron-rl-weights-{secrets.token_hex(6)}"  # unique: an engine may outlive this object
            port = free_port()
            address = self.master_address or _address_toward(engine.url)
            joined = self._pool.submit(engine.client.init_weights_update_group, master_address=address,
                                       master_port=port, rank_offset=1, world_size=2, group_name=name,
                                       backend=self.backend)
            group = init_custom_process_group(self.backend, f"tcp://{address}:{port}", 2, 0, name)
            joined.result()
            self._groups[id(engine)] = (name, group)
        return self._groups[id(engine)]

    def _forget(self, engine: Engine) -> None:
        """Drop this engine's group, on both ends (a restarted engine has lost its end already)."""
        entry = self._groups.pop(id(engine), None)
        if entry is None:
            return
        try:
            engine.client.destroy_weights_update_group(entry[0])
        except EngineError:
            pass  # the engine restarted or is gone: its end of the group went with it
        destroy_custom_process_group(entry[1])

    def _each(self, engines: list[Engine], call) -> None:
        for future in [self._pool.submit(call, engine) for engine in engines]:
            future.result()

    def _verify(self, engines: list[Engine], sent: list[tuple[str, torch.Tensor]], version: int) -> list[str]:
        """Every engine is at `version` and holds the sent values of a few sampled tensors."""
        sample = _sample_names([name for name, _ in sent], self.config.verify_tensors, version)
        by_name = dict(sent)
        for engine in engines:
            reported = engine.client.get_weight_version()
            if reported != str(version):
                raise WeightSyncError(f"engine {engine.url} reports weight_version {reported!r} after a push of "
                                      f"version {version}")
            for name in sample:
                try:
                    got = torch.tensor(engine.client.get_weights_by_name(name, truncate_size=VERIFY_VALUES))
                except EngineError as exc:
                    if exc.status != 400:
                        raise
                    # SGLang 0.5.23 reads weights by name for Llama-family models only
                    log.warning("engine %s cannot return weights by name (%s): verified its weight_version only",
                                engine.url, exc.message)
                    break
                if not _same_values(by_name[name].flatten()[:VERIFY_VALUES], got):
                    raise WeightSyncError(f"engine {engine.url} holds other values of {name!r} than version "
                                          f"{version} sent: first values {got[:4].tolist()} vs "
                                          f"{by_name[name].flatten()[:4].tolist()}")
        return sample

    def close(self) -> None:
        for engine in list(self.engines):
            self._forget(engine)
        self._pool.shutdown(wait=False)
        if self._files is not None:
            self._files.close()


def _begin_session(engine: Engine) -> None:
    """/begin_weight_update; a session left open by a crashed push (SGLang refuses a second begin) is closed
    and begun again."""
    try:
        engine.client.begin_weight_update()
    except EngineError as exc:
        if exc.status != 400 or "already open" not in exc.message:
            raise
        engine.client.end_weight_update()
        engine.client.begin_weight_update()


def _same_values(sent: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal as sent, or as sent rounded to a lower precision the engine may run in."""
    if got.shape != sent.shape:
        return False
    sent = sent.float()
    return any(torch.equal(sent.to(dtype).float(), got.float()) for dtype in (torch.float32, *LOW_PRECISIONS))


def _sample_names(names: list[str], count: int, seed: int) -> list[str]:
    """The first and last tensor, and random others (seeded by the version), `count` in all."""
    if len(names) <= count:
        return names
    middle = random.Random(seed).sample(names[1:-1], max(0, count - 2))
    return [names[0], *middle, names[-1]][:count]


def _address_toward(url: str) -> str:
    """This host's address on the route to the engine at `url` (127.0.0.1 for a local one): where it reaches us."""
    parsed = urllib.parse.urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parsed.hostname, parsed.port or 80))  # UDP: chooses the route, sends nothing
        return probe.getsockname()[0]

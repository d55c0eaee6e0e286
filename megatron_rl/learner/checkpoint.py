"""Checkpoints of the learner: Megatron's distributed checkpoint plus the full RL state.

    save_checkpoint(cfg.checkpoint.dir, step, model, optimizer, scheduler,
                    {"data_cursor": cursor, "weight_version": version}, cfg.checkpoint.keep_last,
                    model_config=cfg.model)
    step = find_latest(cfg.checkpoint.dir)                       # None: nothing to resume
    rl_state = load_checkpoint(cfg.checkpoint.dir, None, model, optimizer, scheduler, model_config=cfg.model)
    rl_state["step"], rl_state["data_cursor"], rl_state["weight_version"]

Collective: every rank of the job calls save_checkpoint / load_checkpoint with its own model
chunks (the DDP-wrapped ones of `optimizer.wrap_data_parallel` or bare GPTModels).

On disk, `<dir>/`:
    latest                 the step of the newest complete checkpoint, as text; written last
    iter_0000002/          one checkpoint (`iter_<step:07d>`):
        .metadata, *.distcp, metadata.json    Megatron dist_checkpointing (torch_dist): the model
                           chunks' sharded_state_dict(), the optimizer's sharded_state_dict(model's)
                           and, in its common state, the LR scheduler's state_dict()
        rl_state.pt        the caller's RL state (rank 0; torch.save, read back with weights_only=True)
        rng/rank_<r>.pt    rank r's RNG states: python, numpy, torch CPU, Megatron's tensor-parallel
                           tracker (each rank)
        checkpoint.json    step, parallel layout, cfg.model, optimizer kind and format (rank 0)

Atomicity: a checkpoint is written into `iter_<step>.tmp/`, renamed to `iter_<step>/` once every
rank is done, and only then `latest` is replaced (write + rename). A crash at any point leaves
`latest` naming the previous complete checkpoint; `find_latest` reads nothing else, so a partial
`iter_` directory is ignored (and overwritten by the next save of that step). After a successful
save the newest `keep_last` checkpoints up to its step are kept; older ones and stale `.tmp`
directories are deleted (newer steps, left by an abandoned run, are kept and reported).

Resharding. Model weights load at any TP / PP / VPP / DP layout (dist_checkpointing maps global
shards). Optimizer state:
- non-distributed optimizer (Megatron's FP32Optimizer): reshards like the weights;
- distributed optimizer, `optimizer_format="fully_reshardable"` (default): gathered over DP at
  save time into per-parameter tensors, so it reshards across TP / PP / DP; costs a gather of
  the optimizer state over the DP group on save;
- distributed optimizer, `optimizer_format="dp_reshardable"`: each rank writes its own buckets,
  no gather; loads only at the same TP / PP / VPP / CP / EP / ETP layout (any DP size);
- Megatron-Core 0.19.2's third format, `fully_sharded_model_space`, fails on save
  ("ShardedTensor.flattened_range is not supported.") and is not offered.
Loading a distributed-optimizer checkpoint into a non-distributed optimizer (or the reverse) is
not supported by Megatron's formats and raises CheckpointError; load the weights only
(optimizer=None) to switch. RNG states are restored only at the layout they were saved at (a
rank of another layout has no counterpart); elsewhere they are left alone with a warning. On a
GPU the default CUDA generator is not saved (no torch.cuda outside platform/): only the tracker's
states, which Megatron's model-parallel dropout draws from.

Megatron-Core 0.19.2 with torch's Adam (no Apex / Transformer Engine, e.g. on CPU): its
DistributedOptimizer cannot build a state dict before the optimizer has state, and cannot copy a
checkpoint's state into Adam's per-parameter `step` tensors, and on load gives all parameters one
shared step tensor (so Adam's next step is wrong). `_materialize_optimizer_state` and
`_load_distributed_optimizer` work around these without changing what is saved.

Megatron's torch_dist writer needs `psutil` and starts a multiprocessing Manager (spawn) on the
first save of a process; the spawned process imports the launcher's `__main__` module again, so
keep the script's top-level imports light and its work under `if __name__ == "__main__"`.
"""

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rl.config import ModelConfig
from megatron_rl.files import fsync_path, write_atomically, write_synced

logger = logging.getLogger(__name__)

FORMAT = "megatron_rl.checkpoint/1"
LATEST = "latest"
METADATA = "checkpoint.json"
RL_STATE = "rl_state.pt"
RNG_DIR = "rng"
OptimizerFormat = Literal["fully_reshardable", "dp_reshardable"]
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
LAYOUT_KEYS = ("world_size", "tp", "pp", "vpp", "cp", "ep", "etp", "dp")
MODEL_PARALLEL_KEYS = ("tp", "pp", "vpp", "cp", "ep", "etp")
IGNORED_MODEL_KEYS = ("hf_path",)  # where the initial weights came from, not what the model is
_ITER = re.compile(r"iter_(\d{7})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, or not matching the model / optimizer."""


def iter_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"iter_{step:07d}"


# --- finding checkpoints -----------------------------------------------------------------------

def find_latest(directory: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in `directory` (its `latest` file), or None when
    the directory or its `latest` file does not exist. Raises CheckpointError when `latest` is
    unreadable or names a checkpoint directory that is missing."""
    root = Path(directory)
    path = root / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} must hold a step number, got {text[:40]!r}: the file is corrupt; "
                              f"delete it to start over or write the step of a complete iter_ directory into it")
    step = int(text)
    if not iter_dir(root, step).is_dir():
        replaced = root / f"iter_{step:07d}.replaced"
        hint = (f"; {replaced.name} is its previous copy, left by an interrupted re-save of step {step}: "
                f"rename it to {iter_dir(root, step).name}" if replaced.is_dir() else "")
        raise CheckpointError(f"{path} names step {step} but {iter_dir(root, step)} does not exist "
                              f"(checkpoints on disk: {_steps_on_disk(root) or 'none'}){hint}")
    return step


def _steps_on_disk(root: Path) -> list[int]:
    """Steps of the `iter_<step>` directories in root (complete or not), ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.fullmatch(p.name)))


def _resolve(root: Path, step: int | None) -> Path:
    """The directory of checkpoint `step` (None: the latest), after checking it is complete."""
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if step is None:
        step = find_latest(root)
        if step is None:
            found = _steps_on_disk(root)
            hint = (f"; iter_ directories for steps {found} exist but no save completed (an interrupted save?); "
                    f"load one explicitly by step if you know it is whole" if found else "")
            raise CheckpointError(f"no checkpoint in {root}: it has no '{LATEST}' file{hint}")
    path = iter_dir(root, step)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint for step {step} in {root} (checkpoints on disk: "
                              f"{_steps_on_disk(root) or 'none'})")
    missing = [name for name in (METADATA, RL_STATE, "metadata.json", ".metadata") if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: missing {', '.join(missing)} "
                              f"(a save interrupted before it was marked complete?)")
    return path


def _read_metadata(path: Path) -> dict:
    try:
        meta = json.loads((path / METADATA).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / METADATA} is corrupt: {error}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}; this code reads {FORMAT!r}")
    return meta


# --- saving ----------------------------------------------------------------------------------

def save_checkpoint(directory: str | os.PathLike, step: int, model: Sequence[torch.nn.Module], optimizer,
                    scheduler, rl_state: Mapping, keep_last: int | None = None, *,
                    model_config: ModelConfig | None = None,
                    optimizer_format: OptimizerFormat = "fully_reshardable") -> Path:
    """Save checkpoint `step` of the model chunks, optimizer (or None), scheduler (or None) and
    rl_state (a dict of tensors, numbers, strings, lists and dicts: data cursor, weight version,
    ...), then point `latest` at it and keep the newest `keep_last` checkpoints (None: all).
    model_config (cfg.model) is recorded and compared on load. Returns the checkpoint directory.
    Collective over every rank."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format must be one of {OPTIMIZER_FORMATS}, got {optimizer_format!r}")
    if not isinstance(rl_state, Mapping):
        raise TypeError(f"rl_state must be a dict, got {type(rl_state).__name__}")
    _check_rl_state(rl_state, "rl_state")
    if "step" in rl_state and rl_state["step"] != step:
        raise ValueError(f"rl_state['step'] = {rl_state['step']} differs from step = {step}")
    _require_psutil()
    chunks = [_unwrap(chunk) for chunk in model]
    root = Path(directory)
    final, tmp = iter_dir(root, step), root / f"iter_{step:07d}.tmp"
    rank = dist.get_rank()

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()

    distributed = optimizer is not None and _is_distributed(optimizer)
    metadata = _sharded_metadata(optimizer_format if distributed else None)
    state = _model_sharded_state_dict(chunks, metadata)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp), content_metadata=_content_metadata(metadata))

    if rank == 0:
        (tmp / RNG_DIR).mkdir()
    dist.barrier()
    _save_synced(capture_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    if rank == 0:
        _save_synced(dict(rl_state), tmp / RL_STATE)
        meta = {
            "format": FORMAT,
            "step": step,
            "megatron_core": version("megatron-core"),
            "layout": current_layout(len(chunks)),
            "model_config": model_config.model_dump(mode="json") if model_config is not None else None,
            "optimizer": None if optimizer is None else {
                "distributed": distributed, "format": optimizer_format if distributed else "per_parameter"},
            "scheduler": scheduler is not None,
        }
        write_synced(tmp / METADATA, json.dumps(meta, indent=2) + "\n")
    dist.barrier()

    if rank == 0:
        # Megatron's writer fsyncs its shard files and .metadata; the rest is flushed here
        fsync_path(tmp / "metadata.json")
        for directory in (tmp / RNG_DIR, tmp):
            fsync_path(directory)
        replaced = root / f"iter_{step:07d}.replaced"
        if final.exists():  # a re-save of this step (e.g. after resuming from an older one)
            if replaced.exists():
                shutil.rmtree(replaced)
            final.rename(replaced)
        tmp.rename(final)
        fsync_path(root)
        write_atomically(root / LATEST, f"{step}\n")
        if replaced.exists():
            shutil.rmtree(replaced)
        _prune(root, step, keep_last)
    dist.barrier()
    return final


def _check_rl_state(value, where: str) -> None:
    """rl_state must load back with torch.load(weights_only=True): name the first value that won't."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: keys must be str or int, got {type(key).__name__} {key!r}")
            _check_rl_state(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_rl_state(item, f"{where}[{index}]")
    elif not isinstance(value, str | int | float | bool | torch.Tensor | None):
        raise TypeError(f"{where} is a {type(value).__name__}; the RL state may hold tensors, numbers, strings, "
                        f"None, lists, tuples and dicts only")


def _prune(root: Path, current: int, keep_last: int | None) -> None:
    """Delete stale .tmp / .replaced directories and, with keep_last, the complete checkpoints
    older than the newest keep_last up to `current`. Newer steps (an abandoned run's) are kept."""
    for path in root.glob("iter_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob("iter_*.replaced"):
        shutil.rmtree(path, ignore_errors=True)
    if keep_last is None:
        return
    older = [step for step in _steps_on_disk(root) if step <= current]
    for step in older[:-keep_last]:
        shutil.rmtree(iter_dir(root, step), ignore_errors=True)
    newer = [step for step in _steps_on_disk(root) if step > current]
    if newer:
        logger.warning("checkpoint directory %s holds steps %s newer than the checkpoint just saved (%d); "
                       "they are from an earlier run and were kept", root, newer, current)


def _save_synced(obj, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


def _require_psutil() -> None:
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise CheckpointError("Megatron-Core's torch_dist checkpoint writer needs psutil, which is not installed: "
                              "pip install psutil") from None


# --- loading ---------------------------------------------------------------------------------

def load_checkpoint(directory: str | os.PathLike, step: int | None, model: Sequence[torch.nn.Module],
                    optimizer=None, scheduler=None, *, model_config: ModelConfig | None = None) -> dict:
    """Load checkpoint `step` (None: the latest) into the model chunks and, when given, the
    optimizer and the scheduler; restore this rank's RNG states when the parallel layout is the
    one saved. Returns the saved RL state with "step" set. model_config (cfg.model) is compared
    with the saved one first. Collective over every rank.

    The schedule continues with the checkpoint's settings (lr, min_lr, warmup and decay steps:
    Megatron's use_checkpoint_opt_param_scheduler). A weights-only load leaves an existing
    optimizer alone: with separate main parameters (bf16 / fp16 training) call its
    reload_model_params() afterwards.

    Raises FileNotFoundError (no directory), CheckpointError (no / incomplete checkpoint, model
    config mismatch, optimizer state that cannot be loaded into `optimizer`)."""
    path = _resolve(Path(directory), step)
    meta = _read_metadata(path)
    if model_config is not None and meta["model_config"] is not None:
        _compare_model_configs(meta["model_config"], model_config.model_dump(mode="json"), path)
    chunks = [_unwrap(chunk) for chunk in model]
    layout = current_layout(len(chunks))
    saved_layout = meta["layout"]
    if optimizer is not None:
        _check_optimizer_compatible(meta, saved_layout, layout, optimizer, path)
    if scheduler is not None and not meta["scheduler"]:
        raise CheckpointError(f"{path} holds no scheduler state; pass scheduler=None")

    distributed = optimizer is not None and _is_distributed(optimizer)
    metadata = _sharded_metadata(meta["optimizer"]["format"] if distributed else None)
    state = _model_sharded_state_dict(chunks, metadata)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (CheckpointingException, CheckpointException) as error:
        raise CheckpointError(f"cannot load {path} into this model: {error} (saved model config: "
                              f"{meta['model_config']}; saved layout: {saved_layout})") from error

    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{index}"])
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.num_steps = 0  # load_state_dict advances the schedule by the saved step count
        scheduler.load_state_dict(loaded["opt_param_scheduler"])

    if _same_ranks(saved_layout, layout):
        restore_rng_state(torch.load(path / RNG_DIR / f"rank_{dist.get_rank():05d}.pt", weights_only=True))
    elif dist.get_rank() == 0:
        logger.warning("checkpoint %s was saved at layout %s, loading at %s: RNG states are not restored",
                       path, saved_layout, layout)
    rl_state = torch.load(path / RL_STATE, weights_only=True)
    return {**rl_state, "step": meta["step"]}


def _compare_model_configs(saved: dict, current: dict, path: Path) -> None:
    """CheckpointError naming every model key that differs; a key the checkpoint lacks (it predates the key)
    counts as the key's default, the value the model it saved was built with."""
    saved = {**ModelConfig.model_construct().model_dump(mode="json"), **saved}
    keys = sorted((set(saved) | set(current)) - set(IGNORED_MODEL_KEYS))
    differing = [f"{key} (checkpoint {saved.get(key, '<absent>')!r}, now {current.get(key, '<absent>')!r})"
                 for key in keys if saved.get(key) != current.get(key)]
    if differing:
        raise CheckpointError(f"model config differs from the one {path} was saved with: model."
                              + "; model.".join(differing))


def _check_optimizer_compatible(meta: dict, saved_layout: dict, layout: dict, optimizer, path: Path) -> None:
    saved = meta["optimizer"]
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state; pass optimizer=None to load the weights only")
    distributed = _is_distributed(optimizer)
    if saved["distributed"] != distributed:
        kinds = {True: "the distributed optimizer", False: "a non-distributed optimizer"}
        raise CheckpointError(
            f"{path} holds optimizer state of {kinds[saved['distributed']]} but this run uses {kinds[distributed]} "
            f"(optimizer.use_distributed_optimizer); Megatron-Core's formats do not convert between the two. "
            f"Load the weights only (optimizer=None) and start a fresh optimizer, or set "
            f"optimizer.use_distributed_optimizer={saved['distributed']}")
    if saved["format"] == "dp_reshardable":
        changed = [f"{key} {saved_layout[key]} -> {layout[key]}" for key in MODEL_PARALLEL_KEYS
                   if saved_layout[key] != layout[key]]
        if changed:
            raise CheckpointError(
                f"{path} holds distributed-optimizer state in the 'dp_reshardable' format, which loads only at the "
                f"same tp / pp / vpp / cp / ep / etp (changed: {', '.join(changed)}); load the weights only "
                f"(optimizer=None), or save with optimizer_format='fully_reshardable' to change layouts")


def _load_optimizer(optimizer, loaded) -> None:
    subs = _sub_optimizers(optimizer)
    if not any(isinstance(sub, DistributedOptimizer) for sub in subs):
        with torch.no_grad():
            optimizer.load_state_dict(loaded)
        return
    states = [loaded] if len(subs) == 1 else [loaded[key] for key in sorted(loaded)]
    if len(states) != len(subs):
        raise CheckpointError(f"the checkpoint holds {len(states)} optimizers' state, this run has {len(subs)}")
    for sub, state in zip(subs, states, strict=True):
        if isinstance(sub, DistributedOptimizer):
            _load_distributed_optimizer(sub, state)
        else:
            with torch.no_grad():
                sub.load_state_dict(state)


def _load_distributed_optimizer(optimizer: DistributedOptimizer, state: dict) -> None:
    """DistributedOptimizer.load_state_dict, in two halves, for torch's Adam (no Apex / TE), whose
    inner state holds a per-parameter `step` tensor. Megatron-Core 0.19.2 (1) gives every parameter
    the SAME step tensor, which Adam then increments once per parameter, so the bias correction of
    the next step is wrong (measured: weights off by 2e-4 after one step); (2) has its
    parameter-state loaders copy `step` from the checkpoint, which keeps it per param group
    (KeyError 'step'). So the first half sets the step, the second runs with the steps set aside,
    and each parameter gets its own copy back. fp32 main parameters are views of the model's, so
    the copies run under no_grad."""
    state = dict(state)
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    loaders = {"fully_reshardable": optimizer.load_parameter_state_from_fully_reshardable,
               "dp_reshardable": optimizer.load_parameter_state_from_dp_reshardable}
    if sharding_type not in loaders:
        raise CheckpointError(f"unsupported distributed-optimizer state format {sharding_type!r}")
    with torch.no_grad():
        optimizer.load_state_dict(state)  # param groups and step; no parameter state
        inner = optimizer.optimizer.state
        steps = {param: entry.pop("step") for param, entry in inner.items() if "step" in entry}
        try:
            loaders[sharding_type](param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step.clone()


def _same_ranks(saved: dict, current: dict) -> bool:
    return all(saved.get(key) == current.get(key) for key in LAYOUT_KEYS)


# --- shared pieces ---------------------------------------------------------------------------

def current_layout(num_chunks: int) -> dict:
    """This job's parallel layout, from Megatron's parallel state."""
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": num_chunks if num_chunks > 1 else None,
        "cp": parallel_state.get_context_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "etp": parallel_state.get_expert_tensor_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP (or another wrapper with a .module)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    return any(isinstance(sub, DistributedOptimizer) for sub in _sub_optimizers(optimizer))


def _sharded_metadata(optimizer_format: str | None) -> dict:
    """What Megatron's sharded_state_dict methods read (Megatron-LM's conventions for torch_dist)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    if optimizer_format is not None:
        metadata["distrib_optim_sharding_type"] = optimizer_format
    return metadata


def _content_metadata(metadata: dict) -> dict:
    return {key: value for key, value in metadata.items() if key != "dp_cp_group"}


def _model_sharded_state_dict(chunks: list[torch.nn.Module], metadata: dict) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{index}": chunk.sharded_state_dict(metadata=metadata) for index, chunk in enumerate(chunks)}


def _materialize_optimizer_state(optimizer) -> None:
    """Give every parameter the Adam state a first step would create (zero moments, step 0), so
    Megatron can build a state dict before any step (to save it, or to load into it)."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        empty = [(group, param) for group in inner.param_groups for param in group["params"]
                 if not inner.state.get(param)]
        if not empty:
            continue
        if not isinstance(inner, torch.optim.Adam):  # AdamW is an Adam
            if getattr(sub, "init_state_fn", None) is not None:
                sub.init_state_fn(inner, sub.config)
            continue
        for group, param in empty:
            entry = {"step": torch.zeros((), dtype=torch.float32),
                     "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                entry["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            inner.state[param] = entry


# --- RNG -------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, Megatron's tensor-parallel tracker), in
    types that torch.load(weights_only=True) reads back."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "tracker": {state_name: state.clone() for state_name, state in tracker.items()},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    version_, internal, gauss = state["python"]
    random.setstate((version_, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states({name: s.clone() for name, s in state["tracker"].items()})

"""Checkpoint conversion: Hugging Face safetensors <-> Megatron-Core dist checkpoints, at any layout.

    torchrun --nproc-per-node 2 -m megatron_rl.cli convert hf-to-megatron HF_DIR OUT_DIR --tp 2
    torchrun --nproc-per-node 2 -m megatron_rl.cli convert megatron-to-hf CKPT_DIR OUT_DIR --hf-config HF_DIR --ep 2

    convert_hf_to_megatron(hf_dir, out_dir, tp=2)                     # collective, on every rank
    convert_megatron_to_hf(ckpt_dir, out_dir, hf_config=hf_dir, ep=2)  # collective; rank 0 writes

The job's processes are the layout (tp, pp, ep, etp; data-parallel replicas if there are more) or one
process. What can be refused without reading weights is refused before a process group exists, alike
on every rank: an HF config the mapping does not support (models.hf_config), a layout that does not
divide the model (the run configuration's rules) or the job, an output directory that exists (unless
overwrite), a checkpoint that is missing or incomplete, and for megatron-to-hf an HF config that
describes another model than the checkpoint (the differing fields named). HF tensors that are missing,
unexpected or misshapen are named by hf_to_megatron's ValueError.

hf-to-megatron: the model config is derived from HF_DIR/config.json, nothing is written by hand. Each
rank builds its shard of the model uninitialised and walks the mapping (models.hf_mapping.hf_to_megatron)
one Megatron tensor at a time, reading from the memory-mapped safetensors only the HF tensors of the
parameters it holds (the others stand in as shape-only meta tensors), i.e. its pipeline stage's and
its experts' tensors, each whole; it cuts its slice (learner.full_weights.shard_of) and copies it in. So
a rank holds its shard of the model plus one full tensor at a time. The output is learner.checkpoint's
format: step 0, weights only (no optimizer, no scheduler, an empty RL state), the model config
recorded with model.hf_path = HF_DIR; load_checkpoint reads it at any layout.

megatron-to-hf: the checkpoint is loaded at the job's layout (dist_checkpointing reshards), streamed to
rank 0 one full parameter at a time (learner.export.full_parameters), mapped to HF names
(megatron_to_hf), cast to the HF config's `dtype` (float32 when absent) and written as sharded
safetensors (models.hf_checkpoint.write_safetensors) with the given config.json and the tokenizer and
generation files found beside it. Besides its shard of the model, rank 0 holds one full parameter and
at most one output file's tensors.

Both write into a hidden sibling `.OUT_DIR.partial` and rename it to OUT_DIR at the end: a failed
conversion leaves no OUT_DIR (rank 0 removes the partial one; a killed job's is removed by the next
run), and with overwrite an existing OUT_DIR is replaced only once the new one is complete. Rank 0
shows progress over the tensors: a rich bar on a terminal, otherwise a plain line per tenth.
"""

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megatron_rl.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rl.config.errors import ErrorCollector, errors_from_validation, join_key
from megatron_rl.config.schema import _check_model_split
from megatron_rl.learner.checkpoint import CheckpointError, _read_metadata, _resolve, load_checkpoint, save_checkpoint
from megatron_rl.learner.export import full_parameters
from megatron_rl.learner.full_weights import full_name, shard_of
from megatron_rl.learner.model import build_gpt_model, transformer_config, use_transformer_engine
from megatron_rl.models.hf_checkpoint import SafetensorsCheckpoint, write_safetensors
from megatron_rl.models.hf_config import model_config_from_hf, read_hf_config
from megatron_rl.models.hf_mapping import TIED_LM_HEAD, hf_names, hf_to_megatron, megatron_to_hf, rules
from megatron_rl.parallel.state import destroy_parallel, initialize_parallel, launch_from_env

NOT_ARCHITECTURE = ("hf_path", "moe_aux_loss_coeff")  # model config keys that say nothing about the weights
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
            "generation_config.json")  # copied from beside config.json when present
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
REFUSALS = (ValueError, OSError, CheckpointError)  # how a conversion refuses its input


def convert_hf_to_megatron(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                           ep: int = 1, etp: int = 1, overwrite: bool = False) -> Path:
    """Write HF_DIR's model as a Megatron dist checkpoint (module docstring); collective. Returns out_dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model = ModelConfig(**model_config_from_hf(read_hf_config(hf_dir)), hf_path=str(hf_dir.resolve()))
    parallel = conversion_layout(model, tp=tp, pp=pp, ep=ep, etp=etp)
    _refuse_existing(out_dir, overwrite)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    start = time.perf_counter()
    with _parallel_state(parallel):
        chunks = _uninitialised_chunks(model, parallel)
        load_hf_weights(chunks, checkpoint, model, show_progress=dist.get_rank() == 0)
        with _published(out_dir, owner=dist.get_rank() == 0) as staging:
            save_checkpoint(staging, 0, chunks, None, None, {}, model_config=model)
        dist.barrier()  # out_dir is in place for every rank
        _say(f"wrote {out_dir}: a Megatron dist checkpoint of step 0 at tp {tp}, pp {pp}, ep {ep}, etp {etp} "
             f"({time.perf_counter() - start:.1f} s)")
    return out_dir


def convert_megatron_to_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           hf_config: str | os.PathLike, *, step: int | None = None, tp: int = 1, pp: int = 1,
                           ep: int = 1, etp: int = 1, overwrite: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write checkpoint `step` (None: the latest) of checkpoint_dir as an HF safetensors checkpoint (module
    docstring); `hf_config` is an HF checkpoint directory or its config.json. Collective; returns out_dir."""
    config_path = Path(hf_config) / "config.json" if Path(hf_config).is_dir() else Path(hf_config)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: --hf-config takes an HF checkpoint directory or "
                                "its config.json")
    config_text = config_path.read_text()
    hf = json.loads(config_text)
    model = checkpoint_model_config(checkpoint_dir, step, ModelConfig(**model_config_from_hf(hf)), config_path)
    parallel = conversion_layout(model, tp=tp, pp=pp, ep=ep, etp=etp)
    _refuse_existing(Path(out_dir), overwrite)
    dtype = _hf_dtype(hf, config_path)
    extra_files = {"config.json": config_text} | {name: (config_path.parent / name).read_bytes() for name in HF_FILES
                                                  if (config_path.parent / name).is_file()}
    start = time.perf_counter()
    with _parallel_state(parallel):
        chunks = _uninitialised_chunks(model, parallel)
        load_checkpoint(checkpoint_dir, step, chunks, model_config=model)
        full = full_parameters(chunks)  # rank 0 receives; the others send while they iterate
        if dist.get_rank() != 0:
            for _ in full:
                pass
            return Path(out_dir)
        hf_tensors = ((hf_name, hf_tensor.to(dtype)) for name, tensor in full
                      for hf_name, hf_tensor in megatron_to_hf(name, tensor, model))
        with _published(Path(out_dir), owner=True) as staging:
            write_safetensors(staging, _progress(hf_tensors, len(hf_names(model)), "HF tensors written"),
                              max_shard_bytes, extra_files)
        _say(f"wrote {out_dir}: {len(hf_names(model))} {str(dtype).removeprefix('torch.')} tensors, "
             f"{', '.join(['config.json', *sorted(set(extra_files) - {'config.json'})])} "
             f"({time.perf_counter() - start:.1f} s)")
    return Path(out_dir)


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], hf_tensors: Mapping[str, torch.Tensor], model: ModelConfig,
                    show_progress: bool = False) -> None:
    """Copy an HF checkpoint (a lazy SafetensorsCheckpoint, or any name -> tensor mapping) into this rank's
    bare model chunks, reading only the HF tensors of parameters the chunks hold. No communication.

    Raises ValueError when the tensors do not match the model (hf_to_megatron's checks) or a parameter of
    the chunks has no HF counterpart; every parameter of the chunks is written otherwise."""
    te_names = use_transformer_engine()
    mapping = rules(model, te_names)
    megatron_names = {rule.megatron for rule in mapping}
    params: dict[str, list[torch.nn.Parameter]] = {}  # the last stage's tied output layer shares its name
    for chunk in chunks:
        for local_name, param in chunk.named_parameters():
            params.setdefault(full_name(chunk, local_name, megatron_names), []).append(param)
    unmapped = sorted(params.keys() - megatron_names)
    if unmapped:
        raise ValueError(f"parameters of the model have no HF tensor in the mapping: {unmapped[:5]}")
    needed = {name for rule in mapping if rule.megatron in params for name in rule.hf}
    if not model.untie_embeddings_and_output_weights:  # hf_to_megatron compares a stored tied lm_head
        needed |= {TIED_LM_HEAD, "model.embed_tokens.weight"}
    shapes = {name: shape for rule in mapping for name, shape in zip(rule.hf, rule.hf_shapes, strict=True)}
    view = _TensorsOfRank(hf_tensors, needed, shapes)
    steps = _progress(hf_to_megatron(view, model, te_names), len(mapping), "Megatron tensors read", show_progress)
    for name, full in steps:
        for param in params.get(name, ()):
            shard = shard_of(full, param)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: this rank's shard of the HF tensors has shape {tuple(shard.shape)}, "
                                 f"its parameter {tuple(param.shape)}")
            param.copy_(shard)


class _TensorsOfRank(Mapping[str, torch.Tensor]):
    """The HF tensors, with shape-only meta stand-ins for every tensor not in `needed` (not read)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], needed: set[str], shapes: dict[str, tuple[int, ...]]):
        self._tensors, self._needed, self._shapes = tensors, needed, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._needed:
            return self._tensors[name]
        return torch.empty(self._shapes[name], device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def conversion_layout(model: ModelConfig, *, tp: int, pp: int, ep: int, etp: int) -> ParallelConfig:
    """The layout over this job's processes (torchrun / Slurm / one process), checked against the model.

    Raises ConfigError naming each parallel.* key that is wrong, or Megatron-Core's ValueError."""
    world_size = dist.get_world_size() if dist.is_initialized() else launch_from_env(os.environ).world_size
    try:
        parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sequence_parallel=tp > 1, world_size=world_size)
    except ValidationError as error:
        raise ConfigError([(join_key("parallel", key), message)
                           for key, message in errors_from_validation(error)]) from None
    problems = ErrorCollector()
    _check_model_split(model, parallel, problems)
    problems.raise_if_any()
    transformer_config(model, parallel)  # Megatron-Core's own checks
    return parallel


def checkpoint_model_config(checkpoint_dir: str | os.PathLike, step: int | None, derived: ModelConfig,
                            source: Path) -> ModelConfig:
    """The model config recorded in checkpoint `step` (None: the latest), after checking that `derived`
    (from the HF config at `source`) describes the same weights; `derived` when none is recorded.

    Raises CheckpointError naming every architecture field that differs, FileNotFoundError / CheckpointError
    when there is no complete checkpoint."""
    path = _resolve(Path(checkpoint_dir), step)
    saved = _read_metadata(path)["model_config"]
    if saved is None:
        return derived
    fields = ModelConfig.model_fields
    differing = [f"model.{key} (checkpoint {saved.get(key, fields[key].default)!r}, HF config {value!r})"
                 for key, value in derived.model_dump(mode="json").items()
                 if key not in NOT_ARCHITECTURE and saved.get(key, fields[key].default) != value]
    if differing:
        raise CheckpointError(f"{source} describes another model than the checkpoint {path}: "
                              + "; ".join(differing))
    return ModelConfig(**saved)


def _hf_dtype(hf: dict, source: Path) -> torch.dtype:
    field = "dtype" if hf.get("dtype") is not None else "torch_dtype"
    name = hf.get(field) or "float32"
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{source}: field {field!r} = {name!r} is not a floating-point torch dtype")
    return dtype


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite to replace it")


@contextmanager
def _parallel_state(parallel: ParallelConfig):
    """Megatron-Core's parallel state for one conversion; a process group started here is ended here."""
    started = not dist.is_initialized()
    initialize_parallel(parallel)
    try:
        yield
    finally:
        if started:
            destroy_parallel()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()


def _uninitialised_chunks(model: ModelConfig, parallel: ParallelConfig) -> list[torch.nn.Module]:
    """This rank's GPTModel with its parameters allocated but not drawn (every one is overwritten)."""
    config = transformer_config(model, parallel)
    config.perform_initialization = False
    return [build_gpt_model(model, parallel, config=config)]


@contextmanager
def _published(out_dir: Path, owner: bool):
    """The path of a staging directory beside out_dir, not yet existing, that the block writes; on the
    `owner` rank it becomes out_dir when the block succeeds (replacing out_dir) and is removed when it fails."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    replaced = out_dir.with_name(f".{out_dir.name}.replaced")
    if owner:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed conversion
    try:
        yield staging
    except BaseException:
        if owner:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if owner:
        if out_dir.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            out_dir.rename(replaced)
        staging.rename(out_dir)
        shutil.rmtree(replaced, ignore_errors=True)


def _progress[T](items: Iterable[T], total: int, unit: str, show: bool = True) -> Iterator[T]:
    """The items, counted against `total` on the console when `show`: a rich bar on a terminal,
    otherwise a line whenever another tenth is done."""
    if not show:
        yield from items
        return
    if sys.stdout.isatty():
        columns = (BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(unit, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start, tenths = time.perf_counter(), 0
    for done, item in enumerate(items, 1):
        yield item
        if done * 10 // total > tenths or done == total:
            tenths = done * 10 // total
            _say(f"{done}/{total} {unit} ({time.perf_counter() - start:.1f} s)")


def _say(line: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)

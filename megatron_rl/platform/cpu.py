"""Megatron-Core on CPU + gloo: the named patches, pinned to one megatron-core version.

Megatron-Core hard-codes CUDA in a few hundred places (`torch.cuda.current_device()`,
`device="cuda"`, `.cuda()`, streams, the CUDA RNG). On a machine without a GPU each patch below
redirects one family of those sites to the CPU, where every op is synchronous and the CPU
generator is the only generator. Each patch is a `CpuPatch` with its name, the Megatron site it
fixes and why the replacement is exact; `PATCHES` lists them in the order they are applied.

    apply_cpu_patches()                        # all of them, idempotent; returns the names in effect
    apply_cpu_patches({"cuda_stream_stubs"})   # ablation: all but one

Every patch was found necessary on megatron-core SUPPORTED_MEGATRON_CORE with torch 2.13 (the
ablation tests in tests/unit/test_platform_cpu.py and tests/distributed/test_model_parallel.py
fail when a patch becomes unnecessary or insufficient), so any other megatron-core version is
refused: re-run the ablation before moving the pin.

Patches are process-global (CudaToCpuMode: for the applying thread) and cannot be undone.
`triton_stub` must run before megatron.core is imported (it is the reason `ensure_platform()` comes
before any Megatron import); the others import the Megatron modules they patch.
"""

import contextlib
import copy
import functools
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.19.2"


class UnsupportedMegatronCoreVersion(RuntimeError):
    """The installed megatron-core is not the version the CPU patches were verified on."""


@dataclass(frozen=True)
class CpuPatch:
    """One monkeypatch: `site` is the Megatron code it fixes, `why` the reason it is exact.

    `needed` says whether this machine needs it at all (checked at application time).
    """

    name: str
    site: str
    why: str
    apply: Callable[[], None]
    needed: Callable[[], bool] = lambda: True


def installed_megatron_core_version() -> str:
    return metadata.version("megatron-core")


def check_megatron_core_version() -> None:
    """Raise UnsupportedMegatronCoreVersion unless megatron-core == SUPPORTED_MEGATRON_CORE."""
    installed = installed_megatron_core_version()
    if installed != SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronCoreVersion(
            f"megatron-core {installed} is installed, but megatron_rl's CPU platform patches support only "
            f"megatron-core {SUPPORTED_MEGATRON_CORE}. Install megatron-core=={SUPPORTED_MEGATRON_CORE}, or "
            "re-run the patch ablation tests against the new version before changing SUPPORTED_MEGATRON_CORE.")


# --- triton_stub ---------------------------------------------------------------------------------

PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


def _triton_missing() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


def _install_triton_stub() -> None:
    def unavailable(*args, **kwargs):
        raise RuntimeError("the paged-stash triton kernels need triton and a GPU")

    stub = types.ModuleType(PAGED_STASH_OPS, "CPU stand-in: the triton kernels raise when called.")
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = unavailable
    stub.paged_stash_pop_kernel = unavailable
    sys.modules.setdefault(PAGED_STASH_OPS, stub)


# --- cpu_rng -------------------------------------------------------------------------------------

def _track_cpu_generator() -> None:
    from megatron.core.tensor_parallel import random

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    random.CudaRNGStatesTracker.add = add


# --- current_device_cpu --------------------------------------------------------------------------

def _current_device_is_cpu() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")


# --- cuda_literal_redirect -----------------------------------------------------------------------

def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in every torch call to the CPU.

    device="cuda..." -> "cpu"; .to("cuda") -> .to("cpu"); .cuda() and .pin_memory() return the
    tensor itself; pin_memory=True -> False; Tensor.type() names CPU tensors "torch.cuda.*"
    (Megatron's optimizer and grad clipping assert on that name). Torch function modes are
    thread-local: this one covers the thread that applied the patches, where Megatron's forward,
    backward (on the CPU autograd runs in the calling thread) and optimizer step run.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _enter_cuda_to_cpu_mode() -> None:
    CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process


# --- cuda_stream_stubs ---------------------------------------------------------------------------

class SynchronousStream:
    """Stand-in for torch.cuda.Stream and torch.cuda.Event: on the CPU all work is already done."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event=None):
        pass

    def wait_stream(self, stream=None):
        pass

    def record_event(self, event=None):
        return SynchronousStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return 0.0


def _stub_cuda_streams() -> None:
    torch.cuda.Stream = SynchronousStream
    torch.cuda.Event = SynchronousStream
    torch.cuda.current_stream = lambda device=None: SynchronousStream()
    torch.cuda.default_stream = lambda device=None: SynchronousStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# --- sp_torch_norm -------------------------------------------------------------------------------

def _sequence_parallel_torch_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build_norm = WrappedTorchNorm.__new__

    @functools.wraps(build_norm)
    def new(cls, config, *args, **kwargs):
        unsharded = copy.copy(config)  # shallow: the norm reads flags only
        unsharded.sequence_parallel = False
        norm = build_norm(cls, unsharded, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = new


# --- moe_splits_numpy ----------------------------------------------------------------------------

def _moe_splits_as_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    move_to_cpu = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(move_to_cpu)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        "triton_stub",
        site="transformer/moe/ops/paged_stash.py: `import triton` at module top, reached from "
             "pipeline_parallel/schedules.py, so `import megatron.core` fails without triton",
        why="only when triton is not installed: a stand-in module whose kernels raise; they run only "
            "for the paged-stash MoE feature, which needs a GPU",
        apply=_install_triton_stub, needed=_triton_missing),
    CpuPatch(
        "cpu_rng",
        site="tensor_parallel/random.py: CudaRNGStatesTracker.add, _get_cuda_rng_state and "
             "_set_cuda_rng_state read and write torch.cuda generators",
        why="the tracker keeps CPU generator states instead; on a CPU the CPU generator is the one "
            "dropout and initialisation draw from, so fork() swaps the right state",
        apply=_track_cpu_generator),
    CpuPatch(
        "current_device_cpu",
        site="~200 `device=torch.cuda.current_device()` sites: RoPE frequencies "
             "(models/common/embeddings/rotary_pos_embedding.py), the DDP grad buffers, ...",
        why="torch.cuda.current_device() returns torch.device('cpu'), so those tensors land on the CPU",
        apply=_current_device_is_cpu),
    CpuPatch(
        "cuda_literal_redirect",
        site="~70 literal device='cuda' / .cuda() / .to('cuda') / pin_memory sites (the causal mask in "
             "transformer/utils.py, optimizer scale, grad clipping, schedules' token counts, RoPE CP "
             "slicing) and `grad.type() == 'torch.cuda.FloatTensor'` asserts in optimizer/clip_grads.py",
        why="a TorchFunctionMode (the mechanism behind torch.set_default_device) rewrites the "
            "placement of every torch call; values are unchanged",
        apply=_enter_cuda_to_cpu_mode),
    CpuPatch(
        "cuda_stream_stubs",
        site="distributed/param_and_grad_buffer.py: grad sync calls torch.cuda.current_stream() "
             "unconditionally; pipeline and MoE code use Stream/Event/synchronize",
        why="CPU ops are synchronous, so waiting on or recording a stream is a no-op",
        apply=_stub_cuda_streams),
    CpuPatch(
        "sp_torch_norm",
        site="transformer/torch_norm.py: WrappedTorchNorm asserts `not config.sequence_parallel` "
             "(only apex/TE norms support sequence parallelism)",
        why="a norm needs nothing for SP but its parameters tagged `sequence_parallel`, so "
            "finalize_model_grads all-reduces their gradients over the TP group, as for apex/TE",
        apply=_sequence_parallel_torch_norm),
    CpuPatch(
        "moe_splits_numpy",
        site="transformer/moe/moe_utils.py: maybe_move_tensor_to_cpu converts the alltoall "
             "dispatcher's split sizes to numpy only for CUDA tensors; gloo's all_to_all_single "
             "rejects tensor split sizes",
        why="CPU split-size tensors become numpy arrays, the same values in the form gloo accepts",
        apply=_moe_splits_as_numpy),
)
PATCH_NAMES: tuple[str, ...] = tuple(patch.name for patch in PATCHES)

_applied: list[str] = []


def applied_patches() -> tuple[str, ...]:
    """The names of the patches in effect in this process, in order of application."""
    return tuple(_applied)


def parse_disabled(value: str) -> frozenset[str]:
    """Patch names from a comma-separated list (the MEGATRON_RL_DISABLE_CPU_PATCHES format)."""
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def apply_cpu_patches(disabled: Iterable[str] = frozenset()) -> tuple[str, ...]:
    """Apply every needed patch not in `disabled`, each at most once; return the names in effect.

    Raises UnsupportedMegatronCoreVersion before touching anything if megatron-core is not
    SUPPORTED_MEGATRON_CORE, and ValueError for a name that is not a patch.
    """
    disabled = frozenset(disabled)
    unknown = sorted(disabled - set(PATCH_NAMES))
    if unknown:
        raise ValueError(f"unknown CPU patch name(s) {unknown}; the patches are {list(PATCH_NAMES)}")
    check_megatron_core_version()
    for patch in PATCHES:
        if patch.name not in disabled and patch.name not in _applied and patch.needed():
            patch.apply()
            _applied.append(patch.name)
    return applied_patches()

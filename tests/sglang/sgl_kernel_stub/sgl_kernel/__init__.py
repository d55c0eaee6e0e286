"""A pure-torch stand-in for the CPU build of `sgl_kernel`, so that real SGLang 0.5.23 runs on CPU in tests.

PyPI's sglang-kernel wheel holds CUDA ops only (sm90 / sm100 libraries that need libcuda.so.1), and the CPU
build is on no registry. SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) imports `sgl_kernel` at module import;
on a CPU without AMX it then computes with torch_native ops and calls one op from here at run time,
assign_req_to_token_pool_cpu, implemented below. Every other name resolves to a function that raises
NotImplementedError naming the op when called: importing succeeds, an unexpected call fails loudly.

Use: put tests/sglang/sgl_kernel_stub first on PYTHONPATH (ahead of the installed sglang-kernel).
"""

import torch

__version__ = "0.0.0+cpu-stub"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """Write each request's new KV-cache slots into its row of the request -> token table, in place:

        req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = out_cache_loc[o_i:o_i + n_i]
        with n_i = end_offset[i] - start_offset[i] and o_i = n_0 + ... + n_{i-1}

    Shapes: req_pool_indices, start_offset, end_offset [B]; req_to_token [R, pool_len]; out_cache_loc [>= sum n_i].
    """
    lengths = (end_offset - start_offset).tolist()
    if max(end_offset.tolist(), default=0) > pool_len:
        raise ValueError(f"end_offset {end_offset.tolist()} beyond the table's {pool_len} columns")
    pieces = out_cache_loc[:sum(lengths)].split(lengths)
    for row, start, piece in zip(req_pool_indices.tolist(), start_offset.tolist(), pieces, strict=True):
        req_to_token[row, start:start + piece.numel()] = piece.to(req_to_token.dtype)


def _not_implemented(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel CPU stub: {name} is not implemented (tests/sglang/sgl_kernel_stub)")

    op.__name__ = name
    return op


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _not_implemented(name)

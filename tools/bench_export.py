"""Throughput of learner.export.full_parameters: full single-rank bytes per second on rank 0.

    torchrun --standalone --nproc_per_node 2 tools/bench_export.py                  # every layout, tiny model
    torchrun --standalone --nproc_per_node 2 tools/bench_export.py --layouts tp2 pp2 --hidden 512 --layers 8

Per layout (2 ranks, gloo on CPU): the model is built (dense; MoE with 4 experts for ep2 / etp2),
then --repeats exports run, each timed on rank 0 from the call to the last item (every rank
iterates to the end). Printed: the full bytes (numel * element size of everything yielded), the
bytes rank 0 receives from rank 1 (the rest it holds itself), the median seconds of an export,
full bytes / s, and as a yardstick the received bytes' time in ONE send of a flat tensor of that
size from rank 1 to rank 0 (median of --repeats): `vs one send` = export time / that time, the
cost of sending parameter by parameter and merging.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.parallel.state import destroy_parallel, initialize_parallel
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state  # noqa: E402

from megatron_rl.learner import export  # noqa: E402
from megatron_rl.learner.model import build_model_chunks  # noqa: E402

LAYOUTS = {
    "tp2": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "pp2_vpp2": {"pp": 2, "vpp": 2},
    "cp2": {"cp": 2},
    "dp2": {},
    "ep2": {"ep": 2},
    "etp2": {"tp": 2, "sequence_parallel": True, "etp": 2},
}
MOE_LAYOUTS = ("ep2", "etp2")


def model_config(args, moe: bool) -> ModelConfig:
    sizes = {"num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": 2 * args.hidden,
             "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": args.vocab, "max_position_embeddings": 64}
    if moe:
        sizes.update(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=args.hidden,
                     untie_embeddings_and_output_weights=True)
    return ModelConfig(**sizes)


def received_bytes(chunks) -> int:
    """Bytes of the shards rank 0 reads from other ranks (export's own plan)."""
    local = export.local_shards(chunks)
    everyone = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, [shard for shard, _ in local])
    return sum(everyone[rank][position].dtype.itemsize * torch.Size(everyone[rank][position].shape).numel()
               for _, readers in export.read_plan(everyone) for rank, position in readers if rank != 0)


def time_exports(chunks, repeats: int) -> tuple[float, int]:
    """Median seconds of an export on rank 0, and the full bytes it yields."""
    seconds, total = [], 0
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        total = sum(tensor.numel() * tensor.element_size() for _, tensor in export.full_parameters(chunks))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), total


def time_one_send(nbytes: int, repeats: int) -> float:
    """Median seconds to send nbytes as one flat tensor from rank 1 to rank 0."""
    flat = torch.empty(nbytes // 4, dtype=torch.float32)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        if dist.get_rank() == 0:
            dist.recv(flat, src=1)
        elif dist.get_rank() == 1:
            dist.send(flat, dst=0)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for layout in args.layouts:
        parallel = ParallelConfig(**LAYOUTS[layout], world_size=2)
        initialize_parallel(parallel)
        chunks = build_model_chunks(model_config(args, layout in MOE_LAYOUTS), parallel)
        received = received_bytes(chunks)
        seconds, total = time_exports(chunks, args.repeats)
        one_send = time_one_send(received, args.repeats) if received else float("nan")
        rows.append((layout, total, received, seconds, total / seconds, seconds / one_send))
        parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    if dist.get_rank() == 0:
        print(f"{'layout':<10} {'full MB':>8} {'received MB':>12} {'ms':>8} {'full MB/s':>10} {'vs one send':>12}")
        for layout, total, received, seconds, rate, ratio in rows:
            print(f"{layout:<10} {total / 1e6:>8.2f} {received / 1e6:>12.2f} {seconds * 1e3:>8.1f} {rate / 1e6:>10.1f} "
                  f"{ratio:>12.1f}")
    destroy_parallel()


if __name__ == "__main__":
    main()

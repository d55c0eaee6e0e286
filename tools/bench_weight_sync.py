"""Weight sync throughput: a full push to a `megatron-rl serve` engine against a memcpy of the same tensors.

    python tools/bench_weight_sync.py [--layers 8] [--hidden 512] [--vocab 8192] [--repeats 3]

Starts one CPU engine on a random Qwen3 of the given shape, then measures, side by side in one run:
  memcpy       copying every tensor into a preallocated buffer of the same size (the floor)
  disk         WeightSync.push, transport "disk": bucket files under /dev/shm, one /update_weights_from_disk
  distributed  WeightSync.push, transport "distributed": one gloo broadcast and one request per bucket
  per-tensor   the same with buckets of one tensor (one broadcast and one request per tensor)
and prints bytes/s and the ratios to memcpy (goal >= 0.30) and to per-tensor (goal >= 5) of both bucketed
transports. Every push is a new weight version of the same tensors; verification is off while timing (it is a
separate read-back, see rollout.weight_sync.verify).
"""

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_rl.config.sections import EngineSpec, RolloutConfig, WeightSyncConfig
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import launch_engines
from megatron_rl.rollout.weight_sync import WeightSync


def build_checkpoint(path: Path, layers: int, hidden: int, vocab: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float()
    model.save_pretrained(path)
    return [(name, tensor.detach().clone()) for name, tensor in model.state_dict().items()]


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = build_checkpoint(Path(tmp) / "model", args.layers, args.hidden, args.vocab)
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        rollout = RolloutConfig(engines=[EngineSpec(port=free_port())], startup_timeout=120)
        engines = launch_engines(rollout, str(Path(tmp) / "model"), Path(tmp) / "logs", secrets.token_hex(8))
        try:
            buffers = [torch.empty_like(t) for _, t in tensors]
            memcpy = median_seconds(lambda: [b.copy_(t) for b, (_, t) in zip(buffers, tensors, strict=True)],
                                    args.repeats)
            results = {}
            for label, transport, bucket_mb in (("disk", "disk", args.bucket_mb),
                                                ("distributed", "distributed", args.bucket_mb),
                                                ("per-tensor", "distributed", 1e-6)):
                sync = WeightSync(engines, WeightSyncConfig(bucket_mb=bucket_mb, verify="none", transport=transport))
                version = iter(range(1, 1000))
                results[label] = median_seconds(lambda s=sync, v=version: s.push(tensors, next(v)), args.repeats)
                sync.close()
        finally:
            for engine in engines:
                engine.process.stop()
    print(f"{len(tensors)} tensors, {total / 2**20:.1f} MiB, median of {args.repeats}")
    print(f"{'method':<12}{'seconds':>10}{'GB/s':>10}")
    for label, seconds in (("memcpy", memcpy), *results.items()):
        print(f"{label:<12}{seconds:>10.4f}{total / seconds / 1e9:>10.3f}")
    for label in ("disk", "distributed"):
        print(f"{label} / memcpy throughput: {memcpy / results[label]:.3f} (goal >= 0.30); "
              f"{label} / per-tensor: {results['per-tensor'] / results[label]:.2f} (goal >= 5)")


if __name__ == "__main__":
    main()

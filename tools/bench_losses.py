"""Benchmark of the policy losses: time and peak memory, measured side by side in one run.

    python tools/bench_losses.py                 # B=64, T=16384, float32 (the issue's setting)
    python tools/bench_losses.py --batch 8 --length 2048 --repeats 3

Prints, for forward + backward of each loss on the same batch: median time, the ratios
kpo/ppo (goal <= 2), vespo/ppo, trm/ppo, and the KPO filter's per-token Python loop over the
associative scan (goal >= 100). Peak memory: the peak extra resident memory of forward +
backward of one loss in a fresh process (tools/peak_memory.py), as a multiple of one [B, T]
float32 tensor.
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch
from peak_memory import fresh_process_env, peak_extra_mib

from megatron_rl.algorithms.kalman import kalman_filter, kalman_gains
from megatron_rl.algorithms.policy_loss import compute_policy_loss

LOSSES = ("ppo", "kpo", "vespo", "trm", "gspo_token", "gmpo")


def make_batch(batch: int, length: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    log_prob = -torch.rand(batch, length, generator=gen).to(dtype)
    old = log_prob + 0.05 * torch.randn(batch, length, generator=gen).to(dtype)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    adv = torch.randn(batch, 1, generator=gen).to(dtype).expand(batch, length).contiguous()
    return {"log_prob": log_prob, "old": old, "adv": adv, "mask": mask, "rollout": old.clone()}


def forward_backward(name: str, data: dict[str, torch.Tensor]) -> None:
    log_prob = data["log_prob"].clone().requires_grad_()
    loss, _ = compute_policy_loss(name, log_prob, data["old"], data["adv"], data["mask"],
                                  rollout_log_prob=data["rollout"])
    loss.backward()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (gain table cache, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kalman_loop(z: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The per-token reference the scan replaces (same gains, same masking)."""
    gains = kalman_gains(z.shape[-1], q).tolist()
    observed = torch.where(mask, z, torch.zeros_like(z))
    state = torch.zeros(z.shape[0], dtype=z.dtype)
    out = torch.empty_like(z)
    for t, gain in enumerate(gains):
        state = (1 - gain) * state + gain * observed[:, t]
        out[:, t] = state
    return torch.where(mask, out, torch.zeros_like(out))


def peak_memory_mb(name: str, args) -> float:
    """Run one loss in a fresh process; return the peak extra MiB of its forward + backward."""
    cmd = [sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length),
           "--dtype", args.dtype, "--memory-of", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=fresh_process_env())
    return float(out.stdout.strip())


def measure_memory_of(name: str, args) -> None:
    data = make_batch(args.batch, args.length, getattr(torch, args.dtype))
    forward_backward(name, data)  # warm-up: gain table, allocator
    print(peak_extra_mib(lambda: forward_backward(name, data)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return measure_memory_of(args.memory_of, args)

    torch.manual_seed(0)
    data = make_batch(args.batch, args.length, getattr(torch, args.dtype))
    tensor_mb = args.batch * args.length * 4 / 2**20
    print(f"policy losses, forward + backward: B={args.batch} T={args.length} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    seconds = {name: median_seconds(lambda n=name: forward_backward(n, data), args.repeats) for name in LOSSES}
    memory = {name: peak_memory_mb(name, args) for name in LOSSES}
    print(f"{'loss':<12}{'median ms':>12}{'peak +MB':>12}{'x [B,T] f32':>14}")
    for name in LOSSES:
        print(f"{name:<12}{seconds[name] * 1e3:>12.1f}{memory[name]:>12.1f}{memory[name] / tensor_mb:>14.1f}")

    z = (data["log_prob"] - data["old"]).detach()
    scan = median_seconds(lambda: kalman_filter(z, data["mask"], 1e-6), args.repeats)
    loop = median_seconds(lambda: kalman_loop(z, data["mask"], 1e-6), 1)
    error = (kalman_filter(z.double(), data["mask"], 1e-6) - kalman_loop(z.double(), data["mask"], 1e-6)).abs().max()
    print(f"kalman filter: scan {scan * 1e3:.1f} ms, per-token loop {loop * 1e3:.1f} ms "
          f"(float64 max |scan - loop| = {error:.1e})")
    print("ratios (goal):")
    print(f"  kpo / ppo time     {seconds['kpo'] / seconds['ppo']:8.2f}   (<= 2)")
    print(f"  loop / scan time   {loop / scan:8.1f}   (>= 100)")
    print(f"  vespo / ppo time   {seconds['vespo'] / seconds['ppo']:8.2f}")
    print(f"  trm / ppo time     {seconds['trm'] / seconds['ppo']:8.2f}")
    print(f"  kpo / ppo memory   {memory['kpo'] / max(memory['ppo'], 1e-9):8.2f}")


if __name__ == "__main__":
    main()

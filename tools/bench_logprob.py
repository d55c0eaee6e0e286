"""Benchmark of log-prob + entropy from one logits shard, forward + backward: chunked vs naive.

    python tools/bench_logprob.py                    # T=8192, V=151936 (one Qwen vocab shard), float32
    python tools/bench_logprob.py --quick            # T=256, V=4096: a smoke run (ratios not meaningful)
    python tools/bench_logprob.py --dtype bfloat16 --chunk-size 256

Variants, on the same logits [T, V] and labels [T], upstream gradient 1 for both outputs:
- chunked: megatron_rl.parallel.vocab_parallel.log_probs_and_entropy (tp_group=None);
- naive: log_softmax(logits.float() / temperature) over the whole shard, gather, entropy from
  its softmax, plain autograd.

Peak extra memory is measured per variant in a fresh subprocess with
resource.getrusage(RUSAGE_SELF).ru_maxrss (the peak RSS): the logits are created chunk by chunk
(so creating them does not raise the peak), ru_maxrss is read, forward + backward runs once, and
ru_maxrss is read again. The growth includes the gradient w.r.t. the logits (one shard, needed
by any implementation) and is printed as a multiple of one logits shard (T * V * itemsize).
Time: median of --repeats further runs in the same subprocess.

A variant whose expected peak (input + EXPECTED_EXTRA_SHARDS float32 shards) would exceed
--memory-budget-gb runs at fewer tokens (the output says so); the ratios stay comparable.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from megatron_rl.parallel.vocab_parallel import default_chunk_size, log_probs_and_entropy

TEMPERATURE = 0.7
EXPECTED_EXTRA_SHARDS = {"chunked": 1.25, "naive": 5.5}  # float32 shards: measured ~1.1 and ~5.0, plus a margin
TOKEN_MULTIPLE = 256


def chunked(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None):
    return log_probs_and_entropy(logits, labels, temperature=TEMPERATURE, chunk_size=chunk_size)


def naive(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None):
    log_p = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    return log_p.gather(-1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


VARIANTS = {"chunked": chunked, "naive": naive}


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=dtype)
    for start in range(0, tokens, 8):  # no full-size float32 temporary
        rows = logits[start:start + 8]
        rows.copy_(3 * torch.randn(rows.shape, generator=gen))
    return logits.requires_grad_(), torch.randint(0, vocab, (tokens,), generator=gen)


def forward_backward(variant: str, logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None) -> None:
    logits.grad = None
    log_probs, entropy = VARIANTS[variant](logits, labels, chunk_size)
    torch.autograd.backward([log_probs, entropy], [torch.ones_like(log_probs), torch.ones_like(entropy)])


def measure(args) -> None:
    """In a fresh process: peak-RSS growth (bytes) of one forward + backward, then median time."""
    dtype = getattr(torch, args.dtype)
    forward_backward(args.measure, *make_inputs(4, args.vocab, dtype), args.chunk_size)  # one-time library setup
    logits, labels = make_inputs(args.tokens, args.vocab, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward_backward(args.measure, logits, labels, args.chunk_size)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward_backward(args.measure, logits, labels, args.chunk_size)
        times.append(time.perf_counter() - start)
    print(json.dumps({"growth_bytes": growth, "seconds": statistics.median(times)}))


def tokens_within_budget(variant: str, args) -> int:
    itemsize = getattr(torch, args.dtype).itemsize
    row_bytes = args.vocab * (itemsize + 4 * EXPECTED_EXTRA_SHARDS[variant])
    fitting = int(args.memory_budget_gb * 1e9 // row_bytes) // TOKEN_MULTIPLE * TOKEN_MULTIPLE
    return min(args.tokens, max(fitting, TOKEN_MULTIPLE))


def run_variant(variant: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--repeats", str(args.repeats)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936, help="the shard's vocabulary size V_local")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-budget-gb", type=float, default=15.0, help="peak RSS per variant, 1e9 bytes")
    parser.add_argument("--quick", action="store_true", help="T=256, V=4096, one repeat")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.repeats = 256, 4096, 1
    if args.measure:
        return measure(args)

    chunk = args.chunk_size or f"auto ({default_chunk_size(args.vocab, 'cpu')} tokens)"
    print(f"log-prob + entropy, forward + backward, one logits shard: V={args.vocab} {args.dtype}, "
          f"temperature={TEMPERATURE}, chunk_size={chunk}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<9}{'tokens':>8}{'median s':>10}{'ms/1k tok':>11}{'peak +GiB':>11}   "
          "peak extra memory / logits shard")
    for variant in VARIANTS:
        tokens = tokens_within_budget(variant, args)
        result = run_variant(variant, tokens, args)
        shard_bytes = tokens * args.vocab * getattr(torch, args.dtype).itemsize
        goal = "   (goal <= 1.25x)" if variant == "chunked" else ""
        print(f"{variant:<9}{tokens:>8}{result['seconds']:>10.2f}{result['seconds'] / tokens * 1e6:>11.1f}"
              f"{result['growth_bytes'] / 2**30:>11.2f}   {result['growth_bytes'] / shard_bytes:.2f}x{goal}")
        if tokens < args.tokens:
            print(f"  note: {variant} ran at T={tokens} instead of {args.tokens} to fit --memory-budget-gb "
                  f"{args.memory_budget_gb:g} (it needs ~{EXPECTED_EXTRA_SHARDS[variant]:g} float32 shards extra)")


if __name__ == "__main__":
    main()

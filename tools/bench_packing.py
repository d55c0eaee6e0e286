"""Benchmark of sequence packing (data.pack_sequences): RL-step throughput packed vs padded, and the packed attention.

    python tools/bench_packing.py                 # 4 layers, hidden 256, 48 long-tailed samples, budget 2048 tokens
    python tools/bench_packing.py --quick         # a tiny smoke run (numbers not meaningful)

1. Attention on the CPU: the block-diagonal causal attention of one packed row of t tokens cut into
   long-tailed segments (ContextParallelAttention's layout: [t, heads, hn]), forward + backward,
   computed (a) as one SDPA call per segment (what attention.py does) and (b) as one SDPA call over
   the whole row with the block-diagonal mask from segment ids. Printed: the minimum time of each
   over --repeats runs and their largest output difference.
2. The RL step: one process (world size 1, gloo), the same weights in two tiny GPTModels (local
   spec for padded rows; ContextParallelAttention for packed rows), each with its own Adam, the
   same samples (prompt lengths uniform in [P/2, P], response lengths 8 + an exponential of mean
   R/8 capped at R: most short, a few long) and token budget. `PolicyLearner.train_step` (loss
   --loss, old log-probs recomputed once) alternates between the layouts for --repeats rounds after
   --warmup steps each. Printed per layout: micro-batches, the tokens the model computes (rows x S
   summed) against the samples' tokens, the median step time and the throughput in sample tokens
   per second; then packed / padded throughput, and the largest step-loss difference between the
   layouts (they train the same weights the same way: it stays at fp32 rounding).

Measured on the shared 2-core CPU machine (`--threads 1 --repeats 7`, defaults otherwise: 48 samples,
8975 tokens, lengths 50..881, median 142): padded 6 micro-batches computing 10769 tokens (16.7%
padding), median step 8.92 s, 1007 tokens/s; packed 5 micro-batches, 8975 tokens (no padding),
7.37 s, 1218 tokens/s: 1.21x (minimum times 1.09x); step losses equal within 3e-8. Attention:
per segment 34 / 278 ms against the mask's 135 / 2404 ms at t = 1024 / 4096. With 2 threads under
other load the medians scattered too much to rank the layouts (0.6x in one such run).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_rl.config import config_from_dict
from megatron_rl.parallel.state import destroy_parallel, initialize_parallel
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron_rl.algorithms.aggregation import GlobalCounts  # noqa: E402
from megatron_rl.learner.batching import RolloutSample, micro_batches_for_rank  # noqa: E402
from megatron_rl.learner.model import build_model_chunks  # noqa: E402
from megatron_rl.learner.optimizer import build_optimizer, wrap_data_parallel  # noqa: E402
from megatron_rl.learner.step import PolicyLearner  # noqa: E402
from megatron_rl.learner.thd import PackedSequences  # noqa: E402

SEED = 1234
LAYOUTS = ("padded", "packed")


def long_tailed(count: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """count lengths low + Exp(mean (high - low) / 8), capped at high."""
    draws = -(high - low) / 8 * torch.rand(count, generator=generator).log()
    return (low + draws).clamp(max=high).int().tolist()


def make_samples(args) -> list[RolloutSample]:
    generator = torch.Generator().manual_seed(SEED)
    responses = long_tailed(args.samples, 8, args.response_length, generator)
    samples = []
    for index, response in enumerate(responses):
        prompt = int(torch.randint(args.prompt_length // 2, args.prompt_length + 1, (1,), generator=generator))
        samples.append(RolloutSample(torch.randint(1, args.vocab, (prompt,), generator=generator).tolist(),
                                     torch.randint(1, args.vocab, (response,), generator=generator).tolist(),
                                     advantage=(-1.0) ** index * (0.5 + index / args.samples)))
    return samples


def segment_attention(query, key, value, cu_seqlens):
    bounds = cu_seqlens.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(x[start:end].transpose(0, 1) for x in (query, key, value)),
                                                     is_causal=True, enable_gqa=True).transpose(0, 1)
                      for start, end in zip(bounds[:-1], bounds[1:], strict=True)])


def masked_attention(query, key, value, cu_seqlens):
    packing = PackedSequences(cu_seqlens, len(cu_seqlens) - 1)
    segment = torch.arange(len(cu_seqlens) - 1).repeat_interleave(packing.segment_lengths)
    column = torch.arange(packing.width)
    visible = (segment[:, None] == segment[None, :]) & (column[:, None] >= column[None, :])
    return F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (query, key, value)), attn_mask=visible,
                                          enable_gqa=True).transpose(0, 1)


def bench_attention(args) -> None:
    print(f"attention of one packed row, forward + backward, {args.heads} query heads / {args.heads // 2} key-value "
          f"heads of {args.hidden // args.heads}; min over {args.repeats} runs")
    generator = torch.Generator().manual_seed(SEED)
    for tokens in args.attention_tokens:
        lengths, total = [], 0
        while total < tokens:
            lengths.append(min(tokens - total, long_tailed(1, 8, tokens // 2, generator)[0]))
            total += lengths[-1]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        head_dim = args.hidden // args.heads
        q, k, v = (torch.randn(tokens, heads, head_dim, generator=generator, requires_grad=True)
                   for heads in (args.heads, args.heads // 2, args.heads // 2))
        times = {}
        for _ in range(1 + args.repeats):  # the first round warms up
            for name, fn in (("per segment", segment_attention), ("block-diagonal mask", masked_attention)):
                start = time.perf_counter()
                fn(q, k, v, cu_seqlens).sum().backward()
                times.setdefault(name, []).append(time.perf_counter() - start)
        diff = (segment_attention(q, k, v, cu_seqlens) - masked_attention(q, k, v, cu_seqlens)).abs().max().item()
        shown = ", ".join(f"{name} {min(values[1:]) * 1e3:.1f} ms" for name, values in times.items())
        print(f"  t = {tokens} in {len(lengths)} segments (longest {max(lengths)}): {shown}; max |diff| {diff:.1e}")


def run_config(args, pack: bool):
    return config_from_dict({
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": 4 * args.hidden,
                  "num_attention_heads": args.heads, "num_query_groups": args.heads // 2, "vocab_size": args.vocab,
                  "max_position_embeddings": args.prompt_length + args.response_length},
        "parallel": {"world_size": 1},
        "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "lr_warmup_steps": 0, "lr_decay_style": "constant",
                      "clip_grad": 1.0, "use_distributed_optimizer": False, "weight_decay": 0.0},
        "algorithm": {"loss": args.loss},
        "data": {"rollout_batch_size": args.samples, "num_mini_batches": 1, "max_prompt_length": args.prompt_length,
                 "max_response_length": args.response_length, "max_tokens_per_micro_batch": args.max_tokens,
                 "pack_sequences": pack},
        "rollout": {"n_samples_per_prompt": 1},
    })


def bench_step(args) -> None:
    samples = make_samples(args)
    counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
    sample_tokens = sum(len(s) for s in samples)
    configs = {layout: run_config(args, layout == "packed") for layout in LAYOUTS}
    initialize_parallel(configs["padded"].parallel, seed=SEED)
    runs, initial = {}, None
    for layout, cfg in configs.items():
        chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.data.pack_sequences)
        if initial is None:
            initial = chunks[0].state_dict()
        chunks[0].load_state_dict(initial)
        model = wrap_data_parallel(chunks, cfg.optimizer)
        optimizer, scheduler = build_optimizer(model, cfg.optimizer, total_steps=10**9)
        learner = PolicyLearner(cfg, model, optimizer, scheduler)
        micro = micro_batches_for_rank(samples, 1, 0, args.max_tokens, pack=cfg.data.pack_sequences)
        runs[layout] = {"learner": learner, "micro": micro, "old": learner.log_probs(micro), "times": [], "losses": []}

    def step(layout: str) -> tuple[float, float]:
        run = runs[layout]
        start = time.perf_counter()
        result = run["learner"].train_step(run["micro"], counts, old_log_probs=run["old"])
        return time.perf_counter() - start, result.loss

    for _ in range(args.warmup):
        for layout in LAYOUTS:
            runs[layout]["losses"].append(step(layout)[1])
    for round_index in range(args.repeats):
        for layout in (LAYOUTS if round_index % 2 == 0 else LAYOUTS[::-1]):
            seconds, loss = step(layout)
            runs[layout]["times"].append(seconds)
            runs[layout]["losses"].append(loss)
    destroy_parallel()

    lengths = [len(s) for s in samples]
    print(f"\nRL step ({args.loss}), {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, fp32, "
          f"world size 1, {torch.get_num_threads()} threads; {len(samples)} samples, {sample_tokens} tokens (lengths "
          f"{min(lengths)}..{max(lengths)}, median {statistics.median(lengths):.0f}); budget {args.max_tokens} tokens "
          f"per micro-batch; {args.warmup} warm-up steps each, then {args.repeats} alternating rounds")
    print(f"{'layout':<8}{'micro-batches':>14}{'computed tokens':>17}{'padding':>9}{'median s':>10}{'min s':>8}"
          f"{'tokens/s':>10}")
    throughput = {}
    for layout, run in runs.items():
        computed = sum(mb.tokens.numel() for mb in run["micro"])
        median = statistics.median(run["times"])
        throughput[layout] = sample_tokens / median
        print(f"{layout:<8}{len(run['micro']):>14}{computed:>17}{1 - sample_tokens / computed:>9.1%}{median:>10.3f}"
              f"{min(run['times']):>8.3f}{throughput[layout]:>10.0f}")
    loss_diff = max(abs(a - b) for a, b in zip(runs["packed"]["losses"], runs["padded"]["losses"], strict=True))
    print(f"packed / padded throughput: {throughput['packed'] / throughput['padded']:.2f}x "
          f"(min-time ratio {min(runs['padded']['times']) / min(runs['packed']['times']):.2f}x); "
          f"largest step-loss difference between the layouts: {loss_diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--prompt-length", type=int, default=64, help="longest prompt (lengths uniform in [P/2, P])")
    parser.add_argument("--response-length", type=int, default=1024, help="longest response (long-tailed below it)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of a micro-batch")
    parser.add_argument("--loss", default="kpo")
    parser.add_argument("--attention-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab, args.samples = 2, 64, 512, 8
        args.prompt_length, args.response_length, args.max_tokens = 16, 64, 128
        args.attention_tokens, args.warmup, args.repeats = [256], 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_attention(args)
    bench_step(args)


if __name__ == "__main__":
    main()

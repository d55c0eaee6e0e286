"""torchrun worker: vocab-parallel log-probs / entropy / KL on a vocabulary shard against one rank.

Run as `torchrun --standalone --nproc_per_node N vocab_parallel_worker.py OUT_DIR`. Each rank
builds the same logits [B, T, V], computes every function and its gradient unsharded
(tp_group=None), then on its vocabulary slice [rank * V/N, (rank + 1) * V/N) with the world as
TP group, and writes the largest differences per case to OUT_DIR/rank<r>.json.
"""

import itertools
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_rl.parallel.vocab_parallel import (
    log_probs_and_entropy,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
)

SHAPE, VOCAB = (2, 23), 74  # chunk_size 5 divides neither T nor B * T
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
CASES = {
    f"{dtype}/temp={temp}/chunk={chunk}/labels={labels}": (getattr(torch, dtype), temp, chunk, labels)
    for dtype, temp, chunk, labels in itertools.product(TOLERANCE, (1.0, 0.7), (5, None), ("mixed", "last-shard"))
}


def make_inputs(dtype, labels_kind, world):
    """Logits, a second logit set (the KL's p), labels; 'last-shard': every label on the last rank."""
    gen = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(*SHAPE, VOCAB, generator=gen, dtype=torch.float64)
    other = logits + torch.randn(*SHAPE, VOCAB, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, SHAPE, generator=gen)
    labels[0, :2] = torch.tensor([0, VOCAB - 1])
    if labels_kind == "last-shard":
        labels = labels % (VOCAB // world) + VOCAB - VOCAB // world
    return logits.to(dtype), other.to(dtype), labels


def values_and_grads(logits, other, labels, group, temperature, chunk_size):
    """Every public function's values, and its gradient under fixed random upstream gradients."""
    kw = {"tp_group": group, "temperature": temperature, "chunk_size": chunk_size}
    g_lp, g_h, g_kl = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, x_lp, x_h, p, q = (t.clone().requires_grad_() for t in (logits, logits, logits, other, logits))
    log_probs, entropy = log_probs_and_entropy(x, labels, **kw)
    values = {"log_probs": log_probs, "entropy": entropy,
              "log_probs_only": vocab_parallel_log_probs(x_lp, labels, **kw),
              "entropy_only": vocab_parallel_entropy(x_h, **kw), "kl": vocab_parallel_kl(p, q, **kw)}
    upstream = {"log_probs": g_lp, "entropy": g_h, "log_probs_only": g_lp, "entropy_only": g_h, "kl": g_kl}
    torch.autograd.backward([values[k] for k in upstream], [upstream[k].to(logits.dtype) for k in upstream])
    grads = {"log_probs_and_entropy": x.grad, "log_probs_only": x_lp.grad, "entropy_only": x_h.grad,
             "kl_p": p.grad, "kl_q": q.grad}
    return {k: v.detach() for k, v in values.items()}, grads


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def compare_case(dtype, temperature, chunk_size, labels_kind, rank, world):
    logits, other, labels = make_inputs(dtype, labels_kind, world)
    width = VOCAB // world

    def shard(x):
        return x[..., rank * width:(rank + 1) * width]

    values_1, grads_1 = values_and_grads(logits, other, labels, None, temperature, chunk_size)
    values_tp, grads_tp = values_and_grads(shard(logits), shard(other), labels, dist.group.WORLD,
                                           temperature, chunk_size)
    local_labels = labels.clamp(rank * width, (rank + 1) * width - 1) - rank * width
    values_naive, _ = values_and_grads(shard(logits), shard(other), local_labels, None, temperature, chunk_size)
    return {
        "value_diff": max_diff(values_1, values_tp),
        "grad_diff": max_diff({k: shard(g) for k, g in grads_1.items()}, grads_tp),
        "grad_norm": min(g.norm().item() for g in grads_tp.values()),
        "naive_diff": max_diff(values_1, values_naive),
    }


def label_range_errors(world):
    """A label in [V/N, V) is valid under TP; V is not, on every rank."""
    logits, _, labels = make_inputs(torch.float64, "mixed", world)
    local = logits[..., :VOCAB // world]
    vocab_parallel_log_probs(local, labels.fill_(VOCAB - 1), dist.group.WORLD)
    try:
        vocab_parallel_log_probs(local, labels.fill_(VOCAB), dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return ""


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"cases": {name: compare_case(*case, rank, world) for name, case in CASES.items()},
               "label_error": label_range_errors(world)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

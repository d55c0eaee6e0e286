"""torchrun worker: every policy loss on CP shards against the same loss on whole sequences.

Run as `torchrun --standalone --nproc_per_node N cp_loss_worker.py OUT_DIR`. Each rank builds
the same float64 batch, computes the single-rank loss, gradient and metrics on the whole
sequences, then the CP version on its zig-zag shard, and writes the largest differences of
every case to OUT_DIR/rank<r>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_rl.algorithms.diagnostics import sign_flips
from megatron_rl.algorithms.hyperparams import (
    CISPOConfig,
    CorrectionsConfig,
    GeoMaskConfig,
    GSPOConfig,
    IcePopConfig,
    KPOConfig,
    PolicyLossConfig,
    TRMConfig,
    TruncatedISConfig,
    VESPOConfig,
)
from megatron_rl.algorithms.kalman import kalman_filter
from megatron_rl.algorithms.policy_loss import POLICY_LOSSES, compute_policy_loss
from megatron_rl.algorithms.sequence_ops import WHOLE_SEQUENCES, WholeSequences
from megatron_rl.parallel.context_parallel import (
    ContextParallelGroup,
    gather_from_context_parallel,
    split_for_context_parallel,
)

BATCH, LENGTH = 6, 48  # LENGTH divisible by 2 * cp for cp in {2, 4}
ALL_CORRECTIONS = CorrectionsConfig(
    tis=TruncatedISConfig(threshold=1.05), mis=TruncatedISConfig(level="sequence", threshold=1.3),
    icepop=IcePopConfig(low=0.97, high=1.03), geo_mask=GeoMaskConfig(low=0.99, high=1.01),
    trm=TRMConfig(max_k2=0.05, avg_k3=0.02),
)
CASES = {name: PolicyLossConfig() for name in POLICY_LOSSES}
CASES.update({
    "ppo/seq-mean-token-mean": PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"),
    "ppo/seq-mean-token-sum": PolicyLossConfig(loss_agg_mode="seq-mean-token-sum"),
    "ppo/seq-mean-token-sum-norm": PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm"),
    "ppo/all-corrections": PolicyLossConfig(corrections=ALL_CORRECTIONS),
    "gspo/eps=0.05": PolicyLossConfig(gspo=GSPOConfig(eps_low=0.05, eps_high=0.05)),
    "kpo/q=1e-2": PolicyLossConfig(kpo=KPOConfig(q=1e-2, eps_low=0.01, eps_high=0.01)),
    "kpo/unclipped-q=1e-4": PolicyLossConfig(kpo=KPOConfig(q=1e-4, clip=False)),
    "kpo/released-gains": PolicyLossConfig(kpo=KPOConfig(q=1e-3, released_gains=True)),
    "vespo/rollout-mu": PolicyLossConfig(vespo=VESPOConfig(use_rollout_log_prob=True)),
    "trm/combined": PolicyLossConfig(trm=TRMConfig(max_k2=0.1, avg_k3=0.006)),
    "gspo/seq-tis+trm": PolicyLossConfig(corrections=CorrectionsConfig(
        tis=TruncatedISConfig(level="sequence", threshold=1.1), trm=TRMConfig(max_k2=0.05))),
    "gmpo/geo-mask": PolicyLossConfig(corrections=CorrectionsConfig(geo_mask=GeoMaskConfig(0.998, 1.002))),
    "cispo/eps-low": PolicyLossConfig(cispo=CISPOConfig(eps_low=0.05, eps_high=0.05)),
})


def make_batch() -> dict[str, torch.Tensor]:
    """Mixed lengths (so some CP chunks are pure padding), an empty and a length-1 row."""
    gen = torch.Generator().manual_seed(1234)
    lengths = [LENGTH, 37, 11, 1, 0, 29]
    mask = torch.zeros(BATCH, LENGTH)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    log_prob = -torch.rand(BATCH, LENGTH, generator=gen, dtype=torch.float64) * 3
    old = log_prob + torch.randn(BATCH, LENGTH, generator=gen, dtype=torch.float64) * 0.15
    rollout = old + torch.randn(BATCH, LENGTH, generator=gen, dtype=torch.float64) * 0.05
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2, 0.9, -0.1], dtype=torch.float64)[:, None].expand(-1, LENGTH)
    entropy = torch.rand(BATCH, LENGTH, generator=gen, dtype=torch.float64) * 2
    padding = mask == 0
    log_prob = log_prob.masked_fill(padding, float("nan"))  # padding must not matter
    return {"log_prob": log_prob, "old": old.masked_fill(padding, float("-inf")), "rollout": rollout,
            "adv": adv.contiguous(), "mask": mask, "entropy": entropy.masked_fill(padding, float("nan"))}


PROMPT = 16  # the prompt-layout cases put 16 masked prompt columns before the responses
PROMPT_CASES = ("kpo/q=1e-2", "vespo", "trm/combined", "ppo/seq-mean-token-sum-norm", "gspo/eps=0.05")


RAGGED_STARTS = torch.tensor([16, 3, 9, 0, 12, 5])  # per-row prompt lengths (<= PROMPT)


def with_prompt(batch: dict[str, torch.Tensor], starts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same batch laid out as rows [prompt_i | response_i | padding] of width PROMPT + LENGTH,
    row i's response starting at column starts[i] (what the learner feeds the loss)."""
    def place(t, fill):
        out = torch.full((t.shape[0], PROMPT + LENGTH), fill, dtype=t.dtype)
        for row, start in enumerate(starts.tolist()):
            out[row, start:start + LENGTH] = t[row]
        return out

    return {key: place(t, 0.0 if key != "log_prob" else float("nan")) for key, t in batch.items()}


def loss_and_grad(name, config, batch, shard, cp_group):
    loss_name = name.split("/")[0]
    log_prob = shard(batch["log_prob"]).clone().requires_grad_()
    loss, metrics = compute_policy_loss(
        loss_name, log_prob, shard(batch["old"]), shard(batch["adv"]), shard(batch["mask"]),
        rollout_log_prob=shard(batch["rollout"]), config=config, cp_group=cp_group, entropy=shard(batch["entropy"]))
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad.nan_to_num(), metrics


def compare_case(name, config, batch, cp, whole=None):
    """The CP shard (ops cp) against the whole batch on one rank (ops whole, default: plain)."""
    def split(x):
        return split_for_context_parallel(x, cp.rank, cp.size)

    loss_1, grad_1, metrics_1 = loss_and_grad(name, config, batch, lambda x: x, whole)
    loss_cp, grad_cp, metrics_cp = loss_and_grad(name, config, batch, split, cp)
    loss_naive, grad_naive, _ = loss_and_grad(name, config, batch, split, None)  # the shard alone
    metric_diff = max((abs(metrics_1[k].item() - metrics_cp[k].item()) for k in metrics_1), default=0.0)
    return {
        "loss": loss_1.item(),
        "loss_diff": abs(loss_1.item() - loss_cp.item()),
        "grad_diff": (split(grad_1) - grad_cp).abs().max().item(),
        "grad_norm": grad_1.norm().item(),
        "naive_diff": max(abs(loss_1.item() - loss_naive.item()), (split(grad_1) - grad_naive).abs().max().item()),
        "metric_diff": metric_diff,
        "metric_keys_match": sorted(metrics_1) == sorted(metrics_cp),
        "metrics": {k: v.item() for k, v in metrics_1.items()},
    }


def compare_primitives(batch, cp):
    def split(x):
        return split_for_context_parallel(x, cp.rank, cp.size)

    z = (batch["old"] - batch["rollout"]).nan_to_num(neginf=0.0)
    out = {}
    for q in (1e-6, 1e-4, 1e-2, 1.0):
        whole = kalman_filter(z, batch["mask"], q)
        sharded = kalman_filter(split(z), split(batch["mask"]), q, ops=cp)
        out[f"kalman_scan/q={q}"] = (split(whole) - sharded).abs().max().item()
    values = torch.randn(BATCH, LENGTH, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out["seq_max"] = (values.amax(-1) - cp.seq_max(split(values))).abs().max().item()
    out["seq_sum"] = (values.sum(-1) - cp.seq_sum(split(values))).abs().max().item()
    out["gather_split_roundtrip"] = (gather_from_context_parallel(split(values), cp.group) - values).abs().max().item()
    out["positions"] = (gather_from_context_parallel(cp.positions(LENGTH // cp.size), cp.group)
                        - torch.arange(1, LENGTH + 1)).abs().max().item()
    shifted = torch.nn.functional.pad(values[..., :-1], (1, 0))
    out["previous_column"] = (split(shifted) - cp.previous_column(split(values))).abs().max().item()
    return out


def boundary_switches(batch, cp) -> dict[str, list[float]]:
    """Sign flips of a hand-built series whose sign alternates every 6 tokens, so that the flips
    sit at chunk boundaries (all of them for cp = 4, every other one for cp = 2): the CP count,
    the direct loop over each sequence, and the naive count (each rank's shard alone, summed)."""
    mask = batch["mask"]
    columns = torch.arange(LENGTH, dtype=torch.float64)
    series = ((-1.0) ** (columns // 6) * (1 + columns / LENGTH)).expand(BATCH, -1)[None]  # [1, B, T]
    flips, pairs = sign_flips(split_for_context_parallel(series, cp.rank, cp.size),
                              split_for_context_parallel(mask, cp.rank, cp.size), cp)
    loop = [0, 0]
    for row in range(BATCH):
        for t in range(1, LENGTH):
            if mask[row, t - 1] and mask[row, t]:
                loop[1] += 1
                loop[0] += int(series[0, row, t - 1] * series[0, row, t] < 0)
    naive_flips, naive_pairs = sign_flips(split_for_context_parallel(series, cp.rank, cp.size),
                                          split_for_context_parallel(mask, cp.rank, cp.size), WHOLE_SEQUENCES)
    naive = torch.cat([naive_flips, naive_pairs[None]])
    dist.all_reduce(naive)
    return {"cp": [flips.item(), pairs.item()], "loop": loop, "naive": naive.tolist()}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cp = ContextParallelGroup(dist.group.WORLD)
    batch = make_batch()
    cases = {name: compare_case(name, cfg, batch, cp) for name, cfg in CASES.items()}
    for label, starts in (("with-prompt", torch.full((BATCH,), PROMPT)), ("ragged-prompt", RAGGED_STARTS)):
        cp_ops = ContextParallelGroup(dist.group.WORLD, response_start=starts)
        cases.update({f"{name}/{label}": compare_case(name, CASES[name], with_prompt(batch, starts), cp_ops,
                                                      WholeSequences(response_start=starts))
                      for name in PROMPT_CASES})
    results = {"cases": cases, "primitives": compare_primitives(batch, cp),
               "boundary_switches": boundary_switches(batch, cp)}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

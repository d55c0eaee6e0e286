"""torchrun worker: sharded GPTModels against the single-rank model from the same weights.

Run as `torchrun --standalone --nproc_per_node 2 model_worker.py OUT_DIR MODE [MODE ...]` with
MODE in MODES. For each mode, every rank:
1. builds the single-rank reference: Megatron groups with tp = pp = cp = ep = 1 (each rank holds
   the whole model), seed SEED; computes per-token log-probs logp[m, b, t] of the labels
   (-vocab_parallel_cross_entropy) for every micro-batch m, and by plain autograd the gradient of
   L = sum_m sum_{b,t} w[m, b, t] * logp[m, b, t] / n_mb (the MoE aux-loss scale set to 1 / n_mb,
   as Megatron's schedule sets it);
2. builds the sharded model (megatron_rl.learner.model.build_model_chunks), records how far its
   initial weights are from the reference's shards, loads the reference weights
   (`megatron_rl.learner.full_weights.load_full_state`), wraps each chunk in Megatron DDP and runs Megatron's schedule
   (get_forward_backward_func) on the same data, each rank feeding its context-parallel shard
   (split_for_context_parallel): once forward only (as for a log-prob recompute), then forward and
   backward (DDP gradient reduction and finalize_model_grads included);
3. writes to OUT_DIR/rank<r>.json, per mode: max |logp - reference| over the whole sequences (CP
   shards gathered back) of both schedule runs, max |grad - reference shard| over this rank's
   parameters, the initial weight distance, or the traceback if the mode failed.

DP ranks (ep2: dp = 2 for the dense layers) get identical data, so their average is the
single-rank gradient.
"""

import functools
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.parallel.context_parallel import gather_from_context_parallel, split_for_context_parallel
from megatron_rl.parallel.state import initialize_parallel
from megatron_rl.platform import ensure_platform
from megatron_rl.platform.cpu import applied_patches

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from megatron_rl.learner.full_weights import load_full_state, shards_of  # noqa: E402
from megatron_rl.learner.model import build_gpt_model, build_model_chunks  # noqa: E402

SEED = 1234
WORLD_SIZE = 2
BATCH, LENGTH, MICRO_BATCHES = 2, 32, 2  # LENGTH divisible by 2 * cp and by tp (sequence parallel)
DENSE = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=128, max_position_embeddings=64, qk_layernorm=True, add_qkv_bias=True)
MOE = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  vocab_size=128, max_position_embeddings=64, num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64, moe_aux_loss_coeff=0.01,
                  untie_embeddings_and_output_weights=True)
MODES = {
    "tp2_sp": (DENSE, ParallelConfig(tp=2, sequence_parallel=True, world_size=WORLD_SIZE)),
    "cp2": (DENSE, ParallelConfig(cp=2, world_size=WORLD_SIZE)),
    "ep2": (MOE, ParallelConfig(ep=2, world_size=WORLD_SIZE)),
    "pp2": (DENSE, ParallelConfig(pp=2, world_size=WORLD_SIZE)),
    "pp2_vpp2": (DENSE, ParallelConfig(pp=2, vpp=2, world_size=WORLD_SIZE)),
}


def make_batches() -> list[dict[str, torch.Tensor]]:
    """The same MICRO_BATCHES micro-batches on every rank: tokens, labels, weights, positions."""
    generator = torch.Generator().manual_seed(SEED)
    sequences = torch.randint(0, DENSE.vocab_size, (MICRO_BATCHES, BATCH, LENGTH + 1), generator=generator)
    weights = torch.randn(MICRO_BATCHES, BATCH, LENGTH, generator=generator)
    positions = torch.arange(LENGTH).expand(BATCH, LENGTH)
    return [{"tokens": seq[:, :-1], "labels": seq[:, 1:], "weights": w, "position_ids": positions}
            for seq, w in zip(sequences, weights, strict=True)]


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) from TP-sharded logits [b, s, V/tp]: -vocab_parallel_cross_entropy, [b, s]."""
    logits, labels = logits.transpose(0, 1).contiguous(), labels.t().contiguous()
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels).t()


def reference(model_config: ModelConfig, batches) -> dict:
    """Single-rank log-probs, weights and gradient (see the module docstring, step 1)."""
    parallel = ParallelConfig(world_size=WORLD_SIZE)
    initialize_parallel(parallel, seed=SEED)
    model = build_gpt_model(model_config, parallel)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / len(batches))  # shaped as the schedule sets it
    log_probs = [token_log_probs(model(b["tokens"], b["position_ids"], None), b["labels"]) for b in batches]
    loss = sum((logp * b["weights"]).sum() for logp, b in zip(log_probs, batches, strict=True)) / len(batches)
    loss.backward()
    parallel_state.destroy_model_parallel()
    return {"log_probs": torch.stack([logp.detach() for logp in log_probs]),
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


def weighted_log_prob_loss(batch, logits):
    log_probs = token_log_probs(logits, batch["labels"])
    return (log_probs * batch["weights"]).sum(), {"log_probs": log_probs.detach()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None), functools.partial(weighted_log_prob_loss, batch)


def sharded(model_config: ModelConfig, parallel: ParallelConfig, batches, ref: dict) -> dict:
    """Step 2 of the module docstring; returns this rank's differences."""
    initialize_parallel(parallel, seed=SEED)
    cp_rank, cp_size = parallel_state.get_context_parallel_rank(), parallel.cp
    local = [{key: split_for_context_parallel(value, cp_rank, cp_size) for key, value in batch.items()}
             for batch in batches]
    chunks = build_model_chunks(model_config, parallel)
    initial_diff = load_full_state(chunks, ref["weights"])
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk,
                                          disable_bucketing=index > 0) for index, chunk in enumerate(chunks)]
    schedule = functools.partial(
        get_forward_backward_func(), forward_step_func=forward_step, model=ddp_chunks,
        num_microbatches=len(batches), seq_length=LENGTH, micro_batch_size=BATCH)
    result = {"initial_weight_diff": initial_diff}
    for name, forward_only in [("forward_only", True), ("forward_backward", False)]:
        outputs = schedule(data_iterator=[iter(local) for _ in chunks], forward_only=forward_only)
        result["last_stage"] = bool(outputs)  # the schedule returns the loss outputs on the last stage only
        if outputs:
            group = parallel_state.get_context_parallel_group()
            log_probs = torch.stack([gather_from_context_parallel(o["log_probs"], group) for o in outputs])
            result[f"{name}_log_prob_diff"] = (log_probs - ref["log_probs"]).abs().max().item()
    result["grad_diff"] = max((param.main_grad - shard).abs().max().item()
                              for param, shard in shards_of(chunks, ref["grads"]))
    result["grad_scale"] = max(shard.abs().max().item() for _, shard in shards_of(chunks, ref["grads"]))
    parallel_state.destroy_model_parallel()
    return result


def run_mode(mode: str, batches, references: dict) -> dict:
    model_config, parallel = MODES[mode]
    start = time.perf_counter()
    try:
        if id(model_config) not in references:
            references[id(model_config)] = reference(model_config, batches)
        result = sharded(model_config, parallel, batches, references[id(model_config)])
    except Exception:  # recorded for the test to assert on (the ablation expects failures)
        result = {"error": traceback.format_exc()}
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def main(out_dir: str, modes: list[str]) -> None:
    torch.set_num_threads(1)
    batches = make_batches()
    references: dict = {}
    results = {mode: run_mode(mode, batches, references) for mode in modes}
    report = {"rank": dist.get_rank(), "patches": list(applied_patches()), "modes": results}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

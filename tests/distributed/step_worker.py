"""torchrun worker: RL steps of PolicyLearner in a parallel layout, or on one rank (the twin).

    torchrun --standalone --nproc_per_node 1 step_worker.py OUT_DIR reference
    torchrun --standalone --nproc_per_node 2 step_worker.py OUT_DIR MODE [MODE ...]

`reference` (one rank) builds the dense and the MoE model, saves their initial full state dicts
to OUT_DIR, and runs STEPS RL steps for every loss in LOSSES. Each MODE loads the same initial
weights into its layout (`load_full_state`) and runs the same steps on the same samples; the
`*_packed` modes pack the samples into rows (data.pack_sequences) where the twin pads them. Every
run writes, per loss, the step losses, gradient norms and whether a step was skipped, to
OUT_DIR/<mode>.rank<r>.json. The samples are the same everywhere; a DP rank trains on its share.

The old policy is the initial one (log-probs recomputed before the first step and kept), so
steps 2 and 3 are off-policy and the ratios, clips and masks do work.
"""

import json
import sys
import traceback
from pathlib import Path

import torch

from megatron_rl.config import config_from_dict
from megatron_rl.parallel.state import initialize_parallel
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state  # noqa: E402

from megatron_rl.algorithms.aggregation import GlobalCounts  # noqa: E402
from megatron_rl.learner.batching import RolloutSample, micro_batches_for_rank  # noqa: E402
from megatron_rl.learner.full_weights import load_full_state  # noqa: E402
from megatron_rl.learner.model import build_model_chunks  # noqa: E402
from megatron_rl.learner.optimizer import build_optimizer, wrap_data_parallel  # noqa: E402
from megatron_rl.learner.step import PolicyLearner  # noqa: E402

SEED, STEPS, SAMPLES, MAX_TOKENS = 1234, 3, 8, 96
LOSSES = {
    "ppo": {"loss": "ppo"},
    "kpo": {"loss": "kpo", "kpo": {"q": 1e-2, "eps_low": 0.05, "eps_high": 0.05}},
    "vespo": {"loss": "vespo"},
    "trm": {"loss": "trm", "trm": {"max_k2": 0.01}},
}
DENSE = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 128, "max_position_embeddings": 64}
MOE = {**DENSE, "num_layers": 2, "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 64,
       "untie_embeddings_and_output_weights": True}  # no aux loss: it depends on how tokens are batched
PACKED = {"pack_sequences": True}
MODES = {  # name: (model, parallel layout, distributed optimizer, data section)
    "tp2_sp": (DENSE, {"tp": 2, "sequence_parallel": True}, False, {}),
    "pp2": (DENSE, {"pp": 2}, False, {}),
    "pp2_vpp2": (DENSE, {"pp": 2, "vpp": 2}, False, {}),
    "cp2": (DENSE, {"cp": 2}, False, {}),
    "dp2_distopt": (DENSE, {}, True, {}),
    "ep2": (MOE, {"ep": 2}, False, {}),
    "etp2": (MOE, {"tp": 2, "sequence_parallel": True, "etp": 2}, False, {}),
    "tp2_sp_packed": (DENSE, {"tp": 2, "sequence_parallel": True}, False, PACKED),
    "dp2_packed": (DENSE, {}, True, PACKED),
    "pp2_packed": (DENSE, {"pp": 2}, False, PACKED),
    "ep2_packed": (MOE, {"ep": 2}, False, PACKED),
}


def make_samples() -> list[RolloutSample]:
    generator = torch.Generator().manual_seed(SEED)
    samples = []
    for index in range(SAMPLES):
        prompt = torch.randint(1, 128, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator)
        response = torch.randint(1, 128, (int(torch.randint(1, 17, (1,), generator=generator)),), generator=generator)
        samples.append(RolloutSample(prompt.tolist(), response.tolist(), advantage=(-1.0) ** index * (0.5 + index / 8)))
    return samples


def run_config(model: dict, parallel: dict, distributed_optimizer: bool, loss: dict, world_size: int,
               data: dict | None = None):
    return config_from_dict({
        "model": model,
        "parallel": {**parallel, "world_size": world_size},
        "optimizer": {"lr": 2e-4, "min_lr": 2e-4, "lr_warmup_steps": 0, "lr_decay_style": "constant",
                      "clip_grad": 1.0, "use_distributed_optimizer": distributed_optimizer, "weight_decay": 0.0},
        "algorithm": loss,
        "data": {"rollout_batch_size": SAMPLES, "num_mini_batches": 1, "train_steps": STEPS,
                 "max_prompt_length": 8, "max_response_length": 16, **(data or {})},
        "rollout": {"n_samples_per_prompt": 1},
    })


def train(cfg, chunks, model, full_state: dict, samples) -> list[dict]:
    """Load full_state into the chunks, then STEPS steps of cfg's loss with a fresh optimizer."""
    load_full_state(chunks, full_state)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, total_steps=STEPS)
    learner = PolicyLearner(cfg, model, optimizer, scheduler)
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    pad_multiple = 2 * cp * tp if cp > 1 else tp
    micro_batches = micro_batches_for_rank(samples, cfg.parallel.dp, parallel_state.get_data_parallel_rank(),
                                           MAX_TOKENS, pad_multiple, pack=cfg.data.pack_sequences)
    counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
    old = learner.log_probs(micro_batches)
    results = []
    for _ in range(STEPS):
        result = learner.train_step(micro_batches, counts, old_log_probs=old)
        results.append({"loss": result.loss, "grad_norm": result.grad_norm, "skipped": result.skipped,
                        "metrics": result.metrics, "micro_batches": len(micro_batches),
                        "rows": [mb.tokens.shape[0] for mb in micro_batches],
                        "sequences": [len(mb.sample_index) for mb in micro_batches]})
    return results


def run_mode(model_cfg: dict, parallel: dict, distributed_optimizer: bool, world_size: int, samples,
             full_state: dict | None, data: dict | None = None) -> tuple[dict, dict]:
    """Every loss in one parallel layout (built once); returns results per loss and the initial
    full state (the given one, or the freshly built model's)."""
    configs = {name: run_config(model_cfg, parallel, distributed_optimizer, loss, world_size, data)
               for name, loss in LOSSES.items()}
    first = next(iter(configs.values()))
    initialize_parallel(first.parallel, seed=SEED)
    chunks = build_model_chunks(first.model, first.parallel, first.data.pack_sequences)
    if full_state is None:
        full_state = {name: p.detach().clone() for name, p in chunks[0].named_parameters()}
    model = wrap_data_parallel(chunks, first.optimizer)
    results = {name: train(cfg, chunks, model, full_state, samples) for name, cfg in configs.items()}
    parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    return results, full_state


def nan_guard(samples, full_state: dict) -> dict:
    """TP2: NaN logits on TP rank 1 only (a forward hook on the output layer) -> the step is
    skipped on both ranks with the weights bitwise unchanged; with the hook removed, the next step
    is the twin's first step (nothing of the skipped one remains)."""
    cfg = run_config(DENSE, {"tp": 2, "sequence_parallel": True}, True, LOSSES["ppo"], 2)
    initialize_parallel(cfg.parallel, seed=SEED)
    chunks = build_model_chunks(cfg.model, cfg.parallel)
    load_full_state(chunks, full_state)
    model = wrap_data_parallel(chunks, cfg.optimizer)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, total_steps=STEPS)
    learner = PolicyLearner(cfg, model, optimizer, scheduler)
    micro_batches = micro_batches_for_rank(samples, cfg.parallel.dp, parallel_state.get_data_parallel_rank(),
                                           MAX_TOKENS, 2)
    counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
    before = [p.detach().clone() for chunk in chunks for p in chunk.parameters()]

    def poison(module, inputs, output):
        logits, bias = output
        return logits + float("nan"), bias  # stays in the graph: both TP ranks run the same backward

    hook = (chunks[-1].output_layer.register_forward_hook(poison)
            if parallel_state.get_tensor_model_parallel_rank() == 1 else None)
    skipped = learner.train_step(micro_batches, counts)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, (p for c in chunks for p in c.parameters()), strict=True))
    if hook is not None:
        hook.remove()
    after = learner.train_step(micro_batches, counts)
    parallel_state.destroy_model_parallel()
    return {"skipped": skipped.skipped, "skip_reason": skipped.skip_reason, "weights_unchanged": unchanged,
            "lr_before_resume": skipped.learning_rate,
            "next": {"loss": after.loss, "grad_norm": after.grad_norm, "skipped": after.skipped}}


def main(out_dir: Path, modes: list[str]) -> None:
    torch.set_num_threads(1)
    samples = make_samples()
    rank = int(__import__("os").environ["RANK"])
    for mode in modes:
        out = {}
        try:
            if mode == "reference":
                for kind, model_cfg in (("dense", DENSE), ("moe", MOE)):
                    results, full_state = run_mode(model_cfg, {}, False, 1, samples, None)
                    torch.save(full_state, out_dir / f"initial_{kind}.pt")
                    out.update({f"{kind}/{loss}": steps for loss, steps in results.items()})
            elif mode == "nan_guard":
                out["nan_guard"] = nan_guard(samples, torch.load(out_dir / "initial_dense.pt", weights_only=True))
            else:
                model_cfg, parallel, distributed_optimizer, data = MODES[mode]
                kind = "moe" if model_cfg is MOE else "dense"
                full_state = torch.load(out_dir / f"initial_{kind}.pt", weights_only=True)
                results, _ = run_mode(model_cfg, parallel, distributed_optimizer, 2, samples, full_state, data)
                out.update({f"{kind}/{loss}": steps for loss, steps in results.items()})
        except Exception:  # reported to the test, which fails with the traceback
            out["error"] = traceback.format_exc()
            (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(out))
            raise  # the other rank may be waiting in a collective: end the job
        (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

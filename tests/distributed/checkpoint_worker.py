"""torchrun worker: RL steps, checkpoints, resumes and reshards of megatron_rl.learner.checkpoint.

    torchrun --standalone --nproc_per_node 2 checkpoint_worker.py OUT_DIR train
    torchrun --standalone --nproc_per_node 2 checkpoint_worker.py OUT_DIR resume
    torchrun --standalone --nproc_per_node 1 checkpoint_worker.py OUT_DIR single

Each step s of a run is what the RL loop does: draw from every RNG (python, numpy, torch, and
torch inside Megatron's tensor-parallel tracker, as shuffling and dropout would), recompute the
old log-probs of step s's samples (chosen by the data cursor), then one PolicyLearner.train_step
(PPO, Adam, warmup + cosine LR schedule, fp32).

- train (2 ranks), per layout of LAYOUTS: a reference run of K + 1 steps that never saves, then
  a run that saves after step K (tp2 also after step 1, keep_last=1, and step K twice; dp2 also
  a second copy in the dp_reshardable format), records the TP-gathered weights, logits and log-probs of a fixed
  batch at step K, and goes on to step K + 1.
- resume (2 ranks, another seed): each layout loads its checkpoint and takes step K + 1;
  "tp2_distopt" loads the dp2 checkpoint at TP2 with the distributed optimizer (DP1), then tries
  the dp_reshardable copy (must fail: TP changed); "pp2" loads the tp2 checkpoint at PP2 (step K + 1).
- single (1 rank): the tp2 checkpoint at TP1, weights only (logits, log-probs, weights) and then
  with its optimizer (step K + 1); the dp2 checkpoints (both formats) at DP1 with the distributed
  optimizer (step K + 1); the dp2 checkpoint into a non-distributed optimizer (must fail).

Writes OUT_DIR/<mode>.rank<r>.json; rank 0 also writes tensors to OUT_DIR/*.pt.
"""

from __future__ import annotations  # annotations name modules that the __mp_main__ import skips

import json
import os
import sys
import traceback
from pathlib import Path

# Megatron's checkpoint writer starts a multiprocessing Manager with the spawn method, which
# imports this file again as __mp_main__: keep that import cheap (nothing below may use these
# modules at import time, hence no decorators from them).
if __name__ != "__mp_main__":
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from step_worker import DENSE, MAX_TOKENS

    from megatron_rl.config import config_from_dict
    from megatron_rl.parallel.state import initialize_parallel
    from megatron_rl.platform import ensure_platform

    ensure_platform()  # before the first Megatron-Core import
    from megatron.core import parallel_state, tensor_parallel

    from megatron_rl.algorithms.aggregation import GlobalCounts
    from megatron_rl.learner.batching import RolloutSample, collate, plan_micro_batches
    from megatron_rl.learner.checkpoint import (
        CheckpointError,
        capture_rng_state,
        load_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )
    from megatron_rl.learner.full_weights import full_name
    from megatron_rl.learner.model import build_model_chunks
    from megatron_rl.learner.optimizer import build_optimizer, wrap_data_parallel
    from megatron_rl.learner.step import PolicyLearner

SEED, RESUME_SEED, K, TOTAL_STEPS, SAMPLES = 1234, 4321, 2, 8, 8
FIXED_BATCH_PAD = 2  # the fixed batch has the same shape at TP1 and TP2
LAYOUTS = {  # name: (parallel, distributed optimizer)
    "dp2_distopt": ({}, True),
    "tp2": ({"tp": 2}, False),
}


def checkpoint_dir(out_dir: Path, name: str) -> Path:
    return out_dir / "checkpoints" / name


def make_config(parallel: dict, distributed_optimizer: bool, world_size: int):
    return config_from_dict({
        "model": DENSE,
        "parallel": {**parallel, "world_size": world_size},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 1, "lr_decay_style": "cosine",
                      "clip_grad": 1.0, "weight_decay": 0.01, "use_distributed_optimizer": distributed_optimizer},
        "algorithm": {"loss": "ppo"},
        "data": {"rollout_batch_size": SAMPLES, "num_mini_batches": 1, "train_steps": TOTAL_STEPS,
                 "max_prompt_length": 8, "max_response_length": 16},
        "rollout": {"n_samples_per_prompt": 1},
    })


def step_samples(cursor: int) -> list:
    """The rollout of data cursor position `cursor` (the same on every rank and in every job)."""
    generator = torch.Generator().manual_seed(SEED * 1000 + cursor)
    samples = []
    for index in range(SAMPLES):
        prompt = torch.randint(1, 128, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator)
        response = torch.randint(1, 128, (int(torch.randint(1, 17, (1,), generator=generator)),), generator=generator)
        advantage = (0.25 + index / 8) * (-1) ** (index + cursor)
        samples.append(RolloutSample(prompt.tolist(), response.tolist(), advantage=advantage))
    return samples


class Run:
    """One layout's model, optimizer, schedule and learner, built from a fresh seed."""

    def __init__(self, parallel: dict, distributed_optimizer: bool, seed: int):
        self.cfg = make_config(parallel, distributed_optimizer, int(os.environ["WORLD_SIZE"]))
        initialize_parallel(self.cfg.parallel, seed=seed)
        self.chunks = build_model_chunks(self.cfg.model, self.cfg.parallel)
        self.model = wrap_data_parallel(self.chunks, self.cfg.optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg.optimizer, TOTAL_STEPS)
        self.learner = PolicyLearner(self.cfg, self.model, self.optimizer, self.scheduler)
        self.tp = self.cfg.parallel.tp

    def close(self) -> None:
        parallel_state.destroy_model_parallel()  # the process group stays for the next run

    def micro_batches(self, samples, pad_multiple: int | None = None):
        pad = pad_multiple or self.tp
        plan = plan_micro_batches([len(s) for s in samples], self.cfg.parallel.dp, MAX_TOKENS, pad)
        return [collate(samples, indices, pad) for indices in plan[parallel_state.get_data_parallel_rank()]]

    def step(self, cursor: int) -> dict:
        """One RL step on the rollout at `cursor`; RNG draws first, as the loop's sampling would."""
        draws = draw_rngs()
        samples = step_samples(cursor)
        micro_batches = self.micro_batches(samples)
        counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
        old = self.learner.log_probs(micro_batches)
        result = self.learner.train_step(micro_batches, counts, old_log_probs=old)
        assert not result.skipped, result.skip_reason
        return {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.learning_rate, "draws": draws}

    def save(self, directory: Path, step: int, keep_last: int | None, **kwargs) -> None:
        save_checkpoint(directory, step, self.model, self.optimizer, self.scheduler,
                        {"data_cursor": {"epoch": 0, "next": step}, "weight_version": step,
                         "note": torch.arange(3.0)}, keep_last, model_config=self.cfg.model, **kwargs)

    def load(self, directory: Path, *, weights_only: bool = False) -> dict:
        if weights_only:
            return load_checkpoint(directory, None, self.model, model_config=self.cfg.model)
        return load_checkpoint(directory, None, self.model, self.optimizer, self.scheduler,
                               model_config=self.cfg.model)

    def weights(self) -> dict:
        """Every parameter under its single-rank name, gathered over TP (Megatron's split inverted)
        and pipeline stages (the last stage's copy of tied embeddings is dropped for the first's)."""
        size = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group()
        full = {}
        for chunk in self.chunks:
            names = set() if chunk.share_embeddings_and_output_weights else {"output_layer.weight"}
            for name, param in chunk.named_parameters():
                tensor = param.detach()
                if size > 1 and getattr(param, "tensor_model_parallel", False):
                    parts = [torch.empty_like(tensor) for _ in range(size)]
                    dist.all_gather(parts, tensor.contiguous(), group=group)
                    dim, stride = param.partition_dim, param.partition_stride
                    pieces = [part.chunk(stride, dim) for part in parts]
                    tensor = torch.cat([pieces[rank][j] for j in range(stride) for rank in range(size)], dim)
                full[full_name(chunk, name, names)] = tensor.clone()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(stages, full, group=parallel_state.get_pipeline_model_parallel_group())
            full = {name: tensor for stage in reversed(stages) for name, tensor in stage.items()}
        return full

    def logits_and_log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits and label log-probs of a fixed batch (every sample, one micro-batch)."""
        samples = step_samples(10_000)
        batch = collate(samples, list(range(len(samples))), FIXED_BATCH_PAD)
        with torch.no_grad():
            logits = self.chunks[0](batch.tokens, batch.position_ids, None)
        parts = [torch.empty_like(logits) for _ in range(self.tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        log_probs = self.learner.log_probs([batch])[0]
        return torch.cat(parts, dim=-1), log_probs


def draw_rngs() -> list[float]:
    values = [random.random(), float(np.random.rand()), torch.rand(()).item()]
    with tensor_parallel.get_cuda_rng_tracker().fork():
        values.append(torch.rand(()).item())
    return values


def train(out_dir: Path) -> dict:
    out = {}
    for name, (parallel, distributed_optimizer) in LAYOUTS.items():
        run = Run(parallel, distributed_optimizer, SEED)
        steps = [run.step(cursor) for cursor in range(K + 1)]
        out[name] = {"reference": steps, "reference_next_draws": draw_rngs()}
        write_tensors(out_dir, f"{name}.reference.weights", run.weights())
        run.close()

        run = Run(parallel, distributed_optimizer, SEED)
        directory = checkpoint_dir(out_dir, name)
        steps = []
        for cursor in range(K):
            steps.append(run.step(cursor))
            if name == "tp2" or cursor == K - 1:
                run.save(directory, cursor + 1, keep_last=1 if name == "tp2" else None)
        if distributed_optimizer:
            run.save(checkpoint_dir(out_dir, f"{name}_dp_reshardable"), K, None, optimizer_format="dp_reshardable")
        else:
            run.save(directory, K, keep_last=1)  # a re-save of a step replaces its checkpoint
        write_tensors(out_dir, f"{name}.saved.weights", run.weights())
        logits, log_probs = run.logits_and_log_probs()
        write_tensors(out_dir, f"{name}.saved.outputs", {"logits": logits, "log_probs": log_probs})
        steps.append(run.step(K))
        out[name]["saver"] = steps
        run.close()
    return out


def resume(out_dir: Path) -> dict:
    out = {}
    for name, (parallel, distributed_optimizer) in LAYOUTS.items():
        run = Run(parallel, distributed_optimizer, RESUME_SEED)
        state = capture_rng_state()
        unrestored = draw_rngs()  # what this job's own seed gives
        restore_rng_state(state)
        rl_state = run.load(checkpoint_dir(out_dir, name))
        step = run.step(rl_state["data_cursor"]["next"])
        out[name] = {"rl_state": describe(rl_state), "step": step, "next_draws": draw_rngs(),
                     "unrestored_draws": unrestored}
        write_tensors(out_dir, f"{name}.resumed.weights", run.weights())
        run.close()

    run = Run({"tp": 2}, True, RESUME_SEED)
    rl_state = run.load(checkpoint_dir(out_dir, "dp2_distopt"))
    out["tp2_distopt_from_dp2"] = {"step": run.step(rl_state["data_cursor"]["next"])}
    write_tensors(out_dir, "tp2_distopt_from_dp2.weights", run.weights())
    out["tp2_distopt_from_dp2"]["dp_reshardable_error"] = error_of(
        lambda: run.load(checkpoint_dir(out_dir, "dp2_distopt_dp_reshardable")))
    run.close()

    run = Run({"pp": 2}, False, RESUME_SEED)
    rl_state = run.load(checkpoint_dir(out_dir, "tp2"))
    out["pp2_from_tp2"] = {"step": run.step(rl_state["data_cursor"]["next"])}
    write_tensors(out_dir, "pp2_from_tp2.weights", run.weights())
    run.close()
    return out


def single(out_dir: Path) -> dict:
    out = {}
    run = Run({}, False, RESUME_SEED)
    run.load(checkpoint_dir(out_dir, "tp2"), weights_only=True)
    write_tensors(out_dir, "tp1_from_tp2.loaded.weights", run.weights())
    logits, log_probs = run.logits_and_log_probs()
    write_tensors(out_dir, "tp1_from_tp2.outputs", {"logits": logits, "log_probs": log_probs})
    rl_state = run.load(checkpoint_dir(out_dir, "tp2"))
    out["tp1_from_tp2"] = {"step": run.step(rl_state["data_cursor"]["next"])}
    write_tensors(out_dir, "tp1_from_tp2.weights", run.weights())
    out["distopt_into_local_error"] = error_of(lambda: run.load(checkpoint_dir(out_dir, "dp2_distopt")))
    run.close()

    for source in ("dp2_distopt", "dp2_distopt_dp_reshardable"):
        run = Run({}, True, RESUME_SEED)
        rl_state = run.load(checkpoint_dir(out_dir, source))
        out[f"dp1_from_{source}"] = {"step": run.step(rl_state["data_cursor"]["next"])}
        write_tensors(out_dir, f"dp1_from_{source}.weights", run.weights())
        run.close()
    return out


def describe(rl_state: dict) -> dict:
    return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in rl_state.items()}


def error_of(action) -> str | None:
    try:
        action()
    except CheckpointError as error:
        return str(error)
    return None


def write_tensors(out_dir: Path, name: str, tensors: dict) -> None:
    if dist.get_rank() == 0:
        torch.save(tensors, out_dir / f"{name}.pt")


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        out = {"train": train, "resume": resume, "single": single}[mode](out_dir)
    except Exception:  # reported to the test, which fails with the traceback
        (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps({"error": traceback.format_exc()}))
        raise  # the other rank may be waiting in a collective: end the job
    (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

"""torchrun worker: full_parameters in a parallel layout against the single-rank twin.

    torchrun --standalone --nproc_per_node 1 export_worker.py OUT_DIR reference
    torchrun --standalone --nproc_per_node 2 export_worker.py OUT_DIR MODE [MODE ...]

`reference` (one rank) builds the single-rank dense and MoE models (step_worker's, plus QKV bias,
QK layernorm and shared experts, so more kinds of shards are exported), replaces every weight by
weight + 0.02 * N(0, 1) from a seeded generator (no two shards alike, norms not all ones), saves
that full state to OUT_DIR/initial_<kind>.pt, exports it on one rank, trains step_worker's STEPS
PPO steps (`step_worker.train`), saves the twin's weights to OUT_DIR/trained_<kind>.pt and
writes, per kind, the names, the export's names, the names it does not get bitwise, and
trained_change = max |trained - initial| (the steps moved the weights) to reference.rank0.json. Each
MODE of step_worker.MODES loads the initial state into its layout (`load_full_state`), exports
it, trains the same steps on the same samples, and exports again (from the DDP-wrapped chunks).
Rank 0 compares with the twin and writes OUT_DIR/<mode>.rank0.json:
    names           the exported names, in order
    unequal         names whose initial export is not bitwise equal (dtype, shape, values)
    trained_diff    max |exported - twin| after training, over all parameters
    wrong_merge     (tp2_sp, etp2) per deliberately wrong merge (`swapped`: shards in reverse
                    rank order; `stride1`: partition_stride ignored), the names it gets wrong
Other ranks write how many items they received (none). Errors are written, then raised.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch

from megatron_rl.parallel.state import initialize_parallel
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state  # noqa: E402
from step_worker import DENSE, LOSSES, MODES, MOE, SEED, make_samples, run_config, train  # noqa: E402

from megatron_rl.learner import export  # noqa: E402
from megatron_rl.learner.full_weights import load_full_state  # noqa: E402
from megatron_rl.learner.model import build_model_chunks  # noqa: E402
from megatron_rl.learner.optimizer import wrap_data_parallel  # noqa: E402

MODELS = {"dense": {**DENSE, "qk_layernorm": True, "add_qkv_bias": True},
          "moe": {**MOE, "qk_layernorm": True, "moe_shared_expert_intermediate_size": 64}}
MERGE = export.merge_shards
WRONG_MERGES = {
    "swapped": lambda shards, dim, stride: MERGE(shards[::-1], dim, stride),
    "stride1": lambda shards, dim, stride: MERGE(shards, dim, 1),
}
NEGATIVE_CONTROL_MODES = ("tp2_sp", "etp2")


def kind_of(mode: str) -> str:
    return "moe" if MODES[mode][0] is MOE else "dense"


def exported(chunks) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor.clone()) for name, tensor in export.full_parameters(chunks)]


def unequal(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in got
            if not (tensor.dtype == want[name].dtype and tensor.shape == want[name].shape
                    and torch.equal(tensor, want[name]))]


def max_diff(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]) -> float:
    return max((tensor - want[name]).abs().max().item() for name, tensor in got)


def build(kind: str, parallel: dict, distributed_optimizer: bool, world_size: int, data: dict | None = None):
    cfg = run_config(MODELS[kind], parallel, distributed_optimizer, LOSSES["ppo"], world_size, data)
    initialize_parallel(cfg.parallel, seed=SEED)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.data.pack_sequences)
    return cfg, chunks, wrap_data_parallel(chunks, cfg.optimizer)


def reference(out_dir: Path, samples) -> dict:
    out = {}
    generator = torch.Generator().manual_seed(SEED)
    for kind in MODELS:
        cfg, chunks, model = build(kind, {}, False, 1)
        initial = {name: param.detach() + 0.02 * torch.randn(param.shape, generator=generator)
                   for name, param in chunks[0].named_parameters()}
        load_full_state(chunks, initial)
        got = exported(chunks)
        train(cfg, chunks, model, initial, samples)
        trained = {name: param.detach().clone() for name, param in chunks[0].named_parameters()}
        torch.save(initial, out_dir / f"initial_{kind}.pt")
        torch.save(trained, out_dir / f"trained_{kind}.pt")
        out[kind] = {"names": list(initial), "exported_names": [name for name, _ in got],
                     "unequal": unequal(got, initial), "trained_change": max_diff(list(trained.items()), initial)}
        parallel_state.destroy_model_parallel()
    return out


def run_mode(mode: str, out_dir: Path, samples, rank: int) -> dict:
    kind = kind_of(mode)
    _, parallel, distributed_optimizer, data = MODES[mode]
    initial = torch.load(out_dir / f"initial_{kind}.pt", weights_only=True)
    twin = torch.load(out_dir / f"trained_{kind}.pt", weights_only=True)
    cfg, chunks, model = build(kind, parallel, distributed_optimizer, 2, data)
    load_full_state(chunks, initial)
    got = exported(chunks)
    wrong = {}
    if mode in NEGATIVE_CONTROL_MODES:
        for variant, merge in WRONG_MERGES.items():
            export.merge_shards = merge
            try:
                wrong[variant] = unequal(exported(chunks), initial)
            finally:
                export.merge_shards = MERGE
    train(cfg, chunks, model, initial, samples)
    after = exported(model)  # the DDP-wrapped chunks this time
    parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    if rank != 0:
        return {"items": len(got) + len(after)}
    return {"names": [name for name, _ in got], "unequal": unequal(got, initial),
            "trained_diff": max_diff(after, twin),
            "wrong_merge": wrong}


def main(out_dir: Path, modes: list[str]) -> None:
    torch.set_num_threads(1)
    samples = make_samples()
    rank = int(os.environ["RANK"])
    for mode in modes:
        try:
            out = reference(out_dir, samples) if mode == "reference" else run_mode(mode, out_dir, samples, rank)
        except Exception:  # reported to the test, which fails with the traceback
            (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps({"error": traceback.format_exc()}))
            raise  # the other rank may be waiting in a collective: end the job
        (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

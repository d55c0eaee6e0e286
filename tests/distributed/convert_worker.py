"""torchrun worker: `megatron-rl convert` in both directions, on one rank and on two.

    torchrun --standalone --nproc_per_node 1 convert_worker.py WORK_DIR one_rank
    torchrun --standalone --nproc_per_node 2 convert_worker.py WORK_DIR two_ranks

WORK_DIR/hf/<model> holds the tiny random transformers checkpoints of `write_hf_models` (the test
writes them first). Every conversion runs the real command, `megatron_rl.cli.main(["convert", ...])`,
in this process (its return code checked).

- one_rank, per model: hf-to-megatron at TP1 to WORK_DIR/megatron/tp1_<model>; for llama with
  --overwrite, over a directory that exists and holds a file `stale`.
- two_ranks, per (model, layout) of LAYOUTS (TP2, PP2 with tied embeddings, EP2, and TP2 + expert-TP2
  for Qwen2-MoE's shared expert and its gate): hf-to-megatron to WORK_DIR/megatron/<layout>_<model>;
  then megatron-to-hf at that layout of this checkpoint and of the one-rank tp1_<model> (resharded on
  load) to WORK_DIR/hf_out/<checkpoint>_at_<layout>.

After each hf-to-megatron every rank loads the checkpoint (learner.checkpoint.load_checkpoint, weights
only, with the model config derived from the HF config) at the conversion's layout, except PP2's,
loaded at DP2 (one forward call per rank), and scores TOKENS; rank 0 records max |logits -
transformers' logits| (TP-gathered, fp32), the RL state and the recorded layout. After each
megatron-to-hf rank 0 records the HF tensors that are not bitwise the original's (dtype, shape,
values), whether the names, config.json and the other files are the original's, and whether
transformers loads the output and scores TOKENS bitwise like the original (both loaded here).
Rank 0 writes WORK_DIR/<launch>.json; an error is written, then raised (so no rank waits in a
collective).
"""

from __future__ import annotations  # annotations name modules that the __mp_main__ import skips

import json
import sys
import traceback
from pathlib import Path

# Megatron's checkpoint writer starts a multiprocessing Manager (spawn), which imports this file
# again as __mp_main__: that import stays cheap.
if __name__ != "__mp_main__":
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_rl.cli import main as cli
    from megatron_rl.config import ModelConfig, ParallelConfig
    from megatron_rl.models.hf_checkpoint import SafetensorsCheckpoint
    from megatron_rl.models.hf_config import model_config_from_hf, read_hf_config
    from megatron_rl.parallel.state import initialize_parallel
    from megatron_rl.platform import ensure_platform

    ensure_platform()  # before the first Megatron-Core import
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_rl.learner.checkpoint import load_checkpoint
    from megatron_rl.learner.model import build_model_chunks

SEED = 20240611
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}
MODELS = {  # name: (model_type, config fields beyond COMMON)
    "llama": ("llama", {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    "qwen3": ("qwen3", {"tie_word_embeddings": False, "head_dim": 24}),
    "qwen3_moe": ("qwen3_moe", {"tie_word_embeddings": False, "head_dim": 24, "num_experts": 4,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "qwen2_moe": ("qwen2_moe", {"tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}),
}
LAYOUTS = [("llama", "tp2"), ("llama", "pp2"), ("qwen3", "tp2"), ("qwen3_moe", "ep2"), ("qwen2_moe", "etp2")]
FLAGS = {"tp1": [], "tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "ep2": ["--ep", "2"],
         "etp2": ["--tp", "2", "--etp", "2"]}
LOADED_AT = {"tp1": {}, "tp2": {"tp": 2, "sequence_parallel": True}, "pp2": {}, "ep2": {"ep": 2},
             "etp2": {"tp": 2, "sequence_parallel": True, "etp": 2}}  # ParallelConfig of the logits check
TOKENIZER_FILE = "tokenizer_config.json"  # written beside qwen3's config.json: copied to the output
SAVED_DTYPES = {"qwen3": "bfloat16"}  # the others: float32


def write_hf_models(work_dir: Path) -> None:
    """WORK_DIR/hf/<model>: each model of MODELS, every parameter drawn from a seeded generator (norm
    weights 1 + 0.2 N(0, 1), matrices N(0, 1) / sqrt(fan-in)), saved with save_pretrained in fp32,
    Qwen3 in bf16 (its config's dtype: the conversion back writes bf16)."""
    generator = torch.Generator().manual_seed(SEED)
    for name, (model_type, fields) in MODELS.items():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **fields))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.2 * noise if param_name.endswith("norm.weight") else noise / param.shape[-1] ** 0.5)
        model.to(getattr(torch, SAVED_DTYPES.get(name, "float32"))).save_pretrained(work_dir / "hf" / name)
    (work_dir / "hf" / "qwen3" / TOKENIZER_FILE).write_text('{"model_max_length": 64}\n')


def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(SEED))


def convert(*args: str) -> None:
    code = cli(["convert", *map(str, args)])
    if code != 0:
        raise RuntimeError(f"megatron-rl convert {' '.join(map(str, args))} exited with {code}")


def hf_logits(path: Path) -> torch.Tensor:
    """transformers' logits, in fp32 (a bf16 checkpoint's weights upcast exactly, as the learner's are)."""
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens()).logits


def megatron_logits(hf_dir: Path, checkpoint: Path, layout: str) -> tuple[torch.Tensor, dict, dict]:
    """Logits [b, s, vocab] of the checkpoint loaded at LOADED_AT[layout] (every rank), its RL state and
    recorded layout."""
    model = ModelConfig(**model_config_from_hf(read_hf_config(hf_dir)))
    parallel = ParallelConfig(**LOADED_AT[layout], world_size=dist.get_world_size())
    initialize_parallel(parallel, seed=SEED)
    try:
        chunks = build_model_chunks(model, parallel)
        rl_state = load_checkpoint(checkpoint, None, chunks, model_config=model)
        batch = tokens()
        with torch.no_grad():
            logits = chunks[0](batch, torch.arange(batch.shape[1]).expand_as(batch), None)
            logits = gather_from_tensor_model_parallel_region(logits)
    finally:
        parallel_state.destroy_model_parallel()
    recorded = json.loads((checkpoint / "iter_0000000" / "checkpoint.json").read_text())["layout"]
    return logits, rl_state, recorded


def check_hf_to_megatron(work_dir: Path, model: str, layout: str, *extra: str) -> dict:
    hf_dir, checkpoint = work_dir / "hf" / model, work_dir / "megatron" / f"{layout}_{model}"
    convert("hf-to-megatron", hf_dir, checkpoint, *FLAGS[layout], *extra)
    logits, rl_state, recorded = megatron_logits(hf_dir, checkpoint, layout)
    if dist.get_rank() != 0:
        return {}
    return {"logit_diff": (logits - hf_logits(hf_dir)).abs().max().item(), "rl_state": rl_state,
            "recorded_layout": recorded}


def check_megatron_to_hf(work_dir: Path, model: str, source: str, layout: str) -> dict:
    hf_dir, out = work_dir / "hf" / model, work_dir / "hf_out" / f"{source}_{model}_at_{layout}"
    convert("megatron-to-hf", work_dir / "megatron" / f"{source}_{model}", out, "--hf-config", hf_dir,
            *FLAGS[layout])
    if dist.get_rank() != 0:
        return {}
    original, written = SafetensorsCheckpoint(hf_dir), SafetensorsCheckpoint(out)
    unequal = [name for name in original if name not in written or not (
        written[name].dtype == original[name].dtype and written[name].shape == original[name].shape
        and torch.equal(written[name], original[name]))]
    other_files = sorted(path.name for path in hf_dir.iterdir() if not path.name.endswith(".safetensors"))
    return {"unequal": unequal, "same_names": set(written) == set(original), "tensors": len(written),
            "files": sorted(path.name for path in out.iterdir()),
            "same_other_files": all((out / name).read_bytes() == (hf_dir / name).read_bytes() for name in other_files),
            "transformers_equal": torch.equal(hf_logits(out), hf_logits(hf_dir))}


def one_rank(work_dir: Path) -> dict:
    existing = work_dir / "megatron" / "tp1_llama"
    existing.mkdir(parents=True)
    (existing / "stale").write_text("replaced by --overwrite\n")
    return {f"tp1_{model}": check_hf_to_megatron(work_dir, model, "tp1", *(["--overwrite"] if model == "llama" else []))
            for model in MODELS}


def two_ranks(work_dir: Path) -> dict:
    out = {}
    for model, layout in LAYOUTS:
        out[f"{layout}_{model}"] = check_hf_to_megatron(work_dir, model, layout)
        for source in (layout, "tp1"):
            out[f"hf_out/{source}_{model}_at_{layout}"] = check_megatron_to_hf(work_dir, model, source, layout)
    return out


def main(work_dir: Path, launch: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # kept across the conversions (each builds and ends its model-parallel groups)
    rank = dist.get_rank()
    try:
        out = {"one_rank": one_rank, "two_ranks": two_ranks}[launch](work_dir)
    except Exception:  # reported to the test, which fails with the traceback
        out = {"error": traceback.format_exc()}
        raise  # the other rank may be waiting in a collective: end the job
    finally:
        if rank == 0:
            (work_dir / f"{launch}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

"""megatron_rl.platform.cpu: every CPU patch is necessary, together they are sufficient, and any
megatron-core but the supported one is refused.

The scenario (this file run as a script in a fresh process) is one training step of a tiny dense
GPTModel on one gloo rank through the real stack: initialize_parallel, build_gpt_model, Megatron
DDP, Megatron's Adam with gradient clipping, and the schedule (get_forward_backward_func) with
vocab_parallel_cross_entropy. triton is hidden, as on a CPU-only install, so triton_stub is needed
too. With every patch it must hold exactly that
- the schedule's loss is torch's cross entropy of the model's logits (|diff| <= 1e-6),
- the DDP main_grads are torch.autograd.grad of that loss (<= 1e-6),
- every weight moved by Adam's first step, -lr * g / (|g| + eps) for the clipped gradient g, to
  within 1e-3 * lr (fp32 rounding of weights of size 1 is 6e-8 = 6e-5 * lr).
With one patch disabled it must fail with the CUDA error at the Megatron site the patch fixes; a
megatron-core upgrade that makes a patch unnecessary therefore fails this test. sp_torch_norm and
moe_splits_numpy only matter with 2 ranks and are ablated in tests/distributed/test_model_parallel.py.
"""

import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from megatron_rl import platform
from megatron_rl.platform import cpu

NO_CUDA = r"Found no NVIDIA driver|Torch not compiled with CUDA enabled"
ABLATIONS = {  # disabled patch -> (Megatron file and function in the traceback, error message)
    "triton_stub": ("transformer/moe/ops/paged_stash.py", "<module>", r"No module named 'triton'|import of triton"),
    "cpu_rng": ("tensor_parallel/random.py", "add", NO_CUDA),
    "current_device_cpu": ("models/common/embeddings/rotary_pos_embedding.py", "get_emb", NO_CUDA),
    "cuda_literal_redirect": ("transformer/utils.py", "get_default_causal_mask", NO_CUDA),
    "cuda_stream_stubs": ("distributed/param_and_grad_buffer.py", "start_grad_sync", NO_CUDA),
}
ABLATED_IN_DISTRIBUTED_TESTS = {"sp_torch_norm", "moe_splits_numpy"}
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LR, CLIP, EPS = 1e-3, 1.0, 1e-8


def run_scenario() -> dict:
    """The training step of the module docstring; returns the checks' largest differences."""
    sys.modules["triton"] = None  # hide triton: `import triton` now raises ImportError
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    platform.ensure_platform()  # before the first Megatron-Core import
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl.config import ModelConfig, ParallelConfig
    from megatron_rl.learner.model import build_gpt_model
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=7)
    model_config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, vocab_size=128, max_position_embeddings=32)
    model = build_gpt_model(model_config, parallel)
    sequences = torch.randint(0, model_config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens, labels, positions = sequences[:, :-1], sequences[:, 1:], torch.arange(16).expand(2, -1)

    params = list(model.parameters())
    reference_loss = F.cross_entropy(model(tokens, positions, None).flatten(0, 1), labels.flatten())
    reference_grads = torch.autograd.grad(reference_loss, params)

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_eps=EPS, clip_grad=CLIP), [ddp])
    before = [param.detach().clone() for param in params]

    def loss_func(logits):
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                            labels.t().contiguous()).mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, module):
        next(data_iterator)
        return module(tokens, positions, None), loss_func

    [reported] = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
        seq_length=16, micro_batch_size=2, forward_only=False)
    grads = [param.main_grad.clone() for param in params]
    grad_diff = max((g - ref).abs().max().item() for g, ref in zip(grads, reference_grads, strict=True))
    _, grad_norm, _ = optimizer.step()
    clip = min(1.0, CLIP / (grad_norm + 1e-6))  # Megatron's clip_grad_norm coefficient
    adam_error = max((after.detach() - start + LR * clip * g / (clip * g.abs() + EPS)).abs().max().item() / LR
                     for after, start, g in zip(params, before, grads, strict=True))
    destroy_parallel()
    reapplied = cpu.apply_cpu_patches()
    return {"reapplied": list(reapplied), "mode_stack_depth": torch._C._len_torch_function_stack(),
            "loss_diff": abs(reported["loss"].item() - reference_loss.item()), "grad_diff": grad_diff,
            "adam_error": adam_error, "grad_norm": grad_norm, "patches": list(cpu.applied_patches())}


def scenario_env(disabled: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return {**env, platform.DISABLE_PATCHES_ENV: disabled}


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory) -> dict[str, dict]:
    """Scenario outcomes keyed by the disabled patch ("" = none), all processes run concurrently."""
    out_dir = tmp_path_factory.mktemp("cpu_patches")
    runs = {}
    for disabled in ["", *ABLATIONS]:
        out = out_dir / f"{disabled or 'all'}.json"
        runs[disabled] = (out, subprocess.Popen([sys.executable, __file__, str(out)], env=scenario_env(disabled),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = {}
    for disabled, (out, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert out.exists(), f"scenario with {disabled or 'no patch'} disabled wrote nothing:\n{stderr[-3000:]}"
        results[disabled] = json.loads(out.read_text())
    return results


def test_all_patches_make_a_training_step_exact(scenario_results):
    result = scenario_results[""]
    assert "error" not in result, result.get("error")
    assert result["patches"] == result["reapplied"] == list(cpu.PATCH_NAMES)
    assert result["mode_stack_depth"] == 1, "applying twice must not stack a second CudaToCpuMode"
    assert result["grad_norm"] > CLIP, "the clipping path must be exercised"
    assert result["loss_diff"] <= 1e-6
    assert result["grad_diff"] <= 1e-6
    assert result["adam_error"] <= 1e-3


@pytest.mark.parametrize("patch", sorted(ABLATIONS))
def test_each_patch_is_necessary(scenario_results, patch):
    site, function, message = ABLATIONS[patch]
    error = scenario_results[patch].get("error")
    assert error is not None, f"megatron-core runs without {patch}: the patch is obsolete, remove it"
    assert re.search(rf'megatron/core/{re.escape(site)}", line \d+, in {re.escape(function)}\n', error), error
    assert re.search(message, error.strip().splitlines()[-1]), error


def test_every_patch_has_an_ablation():
    assert set(ABLATIONS) | ABLATED_IN_DISTRIBUTED_TESTS == set(cpu.PATCH_NAMES)
    assert all(patch.site and patch.why for patch in cpu.PATCHES)


def test_other_megatron_core_versions_are_refused(monkeypatch):
    monkeypatch.setattr(cpu, "installed_megatron_core_version", lambda: "0.20.0")
    applied = cpu.applied_patches()
    with pytest.raises(cpu.UnsupportedMegatronCoreVersion, match=r"megatron-core 0\.20\.0 is installed.*0\.19\.2"):
        cpu.apply_cpu_patches()
    assert cpu.applied_patches() == applied


def test_unknown_patch_names_are_refused():
    with pytest.raises(ValueError, match="unknown CPU patch name.*'cpu_rgn'.*cuda_stream_stubs"):
        cpu.apply_cpu_patches({"cpu_rgn"})


def test_disabled_patches_are_read_from_a_comma_separated_list():
    assert cpu.parse_disabled(" cpu_rng,, sp_torch_norm ") == {"cpu_rng", "sp_torch_norm"}
    assert cpu.parse_disabled("") == frozenset()


def test_nothing_is_patched_when_a_gpu_is_present(monkeypatch):
    monkeypatch.setattr(platform, "gpu_available", lambda: True)
    monkeypatch.setattr(platform, "apply_cpu_patches", lambda disabled: pytest.fail("patched on a GPU machine"))
    assert platform.ensure_platform() == ()
    assert platform.distributed_backend() == "nccl"


if __name__ == "__main__":  # the scenario, in a fresh process: python test_platform_cpu.py OUT.json
    try:
        outcome = run_scenario()
    except Exception:
        outcome = {"error": traceback.format_exc()}
    Path(sys.argv[1]).write_text(json.dumps(outcome))

"""The learner's GPTModel sharded over 2 gloo ranks equals the single-rank model from the same
weights: per-token log-probs of the labels and the gradient of a weighted log-prob loss.

Modes (model_worker.MODES): TP2 + sequence parallel (dense), CP2 with ContextParallelAttention
(dense, zig-zag shards gathered back), EP2 with the alltoall dispatcher (MoE: 4 experts, top-2,
a shared expert, aux loss), PP2 and PP2 x VPP2 (dense, tied embeddings) through Megatron's 1F1B
and interleaved schedules. Log-probs are checked from a forward-only and a forward-backward run of
Megatron's schedule; gradients after DDP's reduction and finalize_model_grads. fp32; tolerance
5e-5 (observed: <= 2e-6).

A second run disables the two CPU patches that only matter with 2 ranks (sp_torch_norm,
moe_splits_numpy) and expects each to break its mode at the Megatron site it fixes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.platform import DISABLE_PATCHES_ENV

WORKER = Path(__file__).with_name("model_worker.py")
WORLD = 2
TOL = 5e-5
MODES = ("tp2_sp", "cp2", "ep2", "pp2", "pp2_vpp2")
ABLATIONS = {  # disabled patch -> (mode it breaks, Megatron file and function in the traceback, error)
    "sp_torch_norm": ("tp2_sp", "transformer/torch_norm.py", "__new__", "sequence parallel not supported"),
    "moe_splits_numpy": ("ep2", "tensor_parallel/mappings.py", "forward",
                         r"all_to_all_single\(\): incompatible function arguments"),
}

pytestmark = pytest.mark.distributed


def launch(out_dir: Path, modes, disabled: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(WORKER),
         str(out_dir), *modes],
        env={**os.environ, DISABLE_PATCHES_ENV: disabled}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """{"all": every patch, "ablated": without ABLATIONS' patches} -> per-rank reports; run concurrently."""
    jobs = {}
    for name, modes, disabled in [("all", MODES, ""),
                                  ("ablated", [mode for mode, *_ in ABLATIONS.values()], ",".join(ABLATIONS))]:
        out_dir = tmp_path_factory.mktemp(name)
        jobs[name] = (out_dir, launch(out_dir, modes, disabled))
    reports = {}
    for name, (out_dir, process) in jobs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]
        reports[name] = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    return reports


def mode_results(runs, mode: str, run: str = "all") -> list[dict]:
    results = [report["modes"][mode] for report in runs[run]]
    for rank, result in enumerate(results):
        assert "error" not in result, f"{mode} failed on rank {rank}:\n{result['error']}"
    return results


@pytest.mark.parametrize("schedule", ["forward_only", "forward_backward"])
@pytest.mark.parametrize("mode", MODES)
def test_log_probs_match_the_single_rank_model(runs, mode, schedule):
    last_stages = [result for result in mode_results(runs, mode) if result["last_stage"]]
    assert last_stages
    for result in last_stages:
        assert result[f"{schedule}_log_prob_diff"] <= TOL, result


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_the_single_rank_model(runs, mode):
    for result in mode_results(runs, mode):
        assert result["grad_diff"] <= TOL, result
        assert result["grad_scale"] > 0.1, "a vanishing gradient would make the comparison vacuous"


@pytest.mark.parametrize("mode", ["tp2_sp", "cp2"])
def test_tensor_and_context_parallel_start_from_the_single_rank_weights(runs, mode):
    """use_cpu_initialization: the full weights are drawn, then sliced, so no copying is needed."""
    for result in mode_results(runs, mode):
        assert result["initial_weight_diff"] == 0.0


@pytest.mark.parametrize("mode", ["ep2", "pp2"])
def test_pipeline_and_expert_shards_need_the_reference_weights(runs, mode):
    """Negative control for the weight remapping: these shards are initialised differently."""
    assert max(result["initial_weight_diff"] for result in mode_results(runs, mode)) > 1e-2


@pytest.mark.parametrize("patch", sorted(ABLATIONS))
def test_two_rank_patches_are_necessary(runs, patch):
    mode, site, function, message = ABLATIONS[patch]
    for report in runs["ablated"]:
        assert patch not in report["patches"]
        error = report["modes"][mode].get("error")
        assert error is not None, f"{mode} runs without {patch}: the patch is obsolete, remove it"
        assert re.search(rf'megatron/core/{re.escape(site)}", line \d+, in {re.escape(function)}\n', error), error
        assert re.search(message, error), error

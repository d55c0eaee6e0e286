"""Checkpoints of the learner (megatron_rl.learner.checkpoint) on real gloo ranks, fp32.

Three torchrun jobs (checkpoint_worker.py): `train` runs K + 1 = 3 RL steps without saving (the
reference) and again saving at step K, per layout (DP2 + distributed optimizer, TP2); `resume`,
a fresh job started from another seed, loads each checkpoint and takes step K + 1; `single`
loads them on one rank (TP1 / DP1). Every step draws from the python, numpy, torch and
tensor-parallel-tracker RNGs, recomputes old log-probs and takes a PPO step with Adam under a
warmup + cosine LR schedule.
"""

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchrun_workers import run_worker

from megatron_rl.learner.checkpoint import CheckpointError, find_latest, load_checkpoint

WORKER = Path(__file__).with_name("checkpoint_worker.py")
K = 2
LAYOUTS = ("dp2_distopt", "tp2")
RESHARD_TOL = 1e-6  # across layouts: other reduction orders; measured <= 2e-7 (a wrong Adam step: 2e-4)
OUTPUT_TOL = 1e-5
pytestmark = pytest.mark.distributed


def torchrun(nproc: int, out_dir: Path, mode: str) -> float:
    start = time.perf_counter()
    run_worker(WORKER, nproc, str(out_dir), mode, timeout=600)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("checkpoint")
    seconds = {mode: torchrun(nproc, out_dir, mode) for nproc, mode in ((2, "train"), (2, "resume"), (1, "single"))}
    results = {}
    for path in out_dir.glob("*.json"):
        result = json.loads(path.read_text())
        assert "error" not in result, result["error"]
        results[path.stem] = result
    print(f"torchrun seconds: {seconds}")
    return SimpleNamespace(dir=out_dir, results=results, seconds=seconds)


def tensors(runs, name: str) -> dict:
    return torch.load(runs.dir / f"{name}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_step_equals_the_uninterrupted_run_bitwise(runs, layout):
    """Save at step K, a fresh job loads it and takes step K + 1: the same loss, gradient norm,
    learning rate and resulting weights as the job that never stopped, to the bit."""
    for rank in (0, 1):
        reference = runs.results[f"train.rank{rank}"][layout]["reference"][K]
        resumed = runs.results[f"resume.rank{rank}"][layout]["step"]
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[key] == reference[key], (rank, key, resumed[key], reference[key])
    reference, resumed = tensors(runs, f"{layout}.reference.weights"), tensors(runs, f"{layout}.resumed.weights")
    assert sorted(reference) == sorted(resumed)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference), max_diff(reference, resumed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saving_leaves_the_run_unchanged(runs, layout):
    for rank in (0, 1):
        train = runs.results[f"train.rank{rank}"][layout]
        assert train["saver"] == train["reference"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rl_state_comes_back(runs, layout):
    for rank in (0, 1):
        assert runs.results[f"resume.rank{rank}"][layout]["rl_state"] == {
            "data_cursor": {"epoch": 0, "next": K}, "weight_version": K, "note": [0.0, 1.0, 2.0], "step": K}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rng_streams_continue_after_resume(runs, layout):
    """python, numpy, torch CPU and the tensor-parallel tracker (drawn inside fork()) give the
    uninterrupted job's next numbers, before and after step K + 1; the resumed job's own seed
    would have given others."""
    for rank in (0, 1):
        train, resumed = runs.results[f"train.rank{rank}"][layout], runs.results[f"resume.rank{rank}"][layout]
        assert resumed["step"]["draws"] == train["reference"][K]["draws"]
        assert resumed["next_draws"] == train["reference_next_draws"]
        assert all(a != b for a, b in zip(resumed["unrestored_draws"], train["reference"][K]["draws"], strict=True))
        assert len({tuple(step["draws"]) for step in train["reference"]}) == K + 1  # the streams move


def test_tp2_checkpoint_loads_at_tp1(runs):
    """Weights only, at TP1 on one rank: the gathered TP2 weights, bitwise, and the TP2 model's
    logits and log-probs of a fixed batch."""
    saved, loaded = tensors(runs, "tp2.saved.weights"), tensors(runs, "tp1_from_tp2.loaded.weights")
    assert sorted(saved) == sorted(loaded)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved), max_diff(saved, loaded)
    tp2, tp1 = tensors(runs, "tp2.saved.outputs"), tensors(runs, "tp1_from_tp2.outputs")
    assert tp2["logits"].shape == tp1["logits"].shape and tp2["logits"].shape[::2] == (8, 128)
    assert (tp2["logits"] - tp1["logits"]).abs().max() <= OUTPUT_TOL
    assert (tp2["log_probs"] - tp1["log_probs"]).abs().max() <= OUTPUT_TOL


@pytest.mark.parametrize(("case", "job", "source"), [
    ("tp1_from_tp2", "single", "tp2"),  # non-distributed optimizer, TP2 -> TP1
    ("dp1_from_dp2_distopt", "single", "dp2_distopt"),  # distributed optimizer, DP2 -> DP1
    ("dp1_from_dp2_distopt_dp_reshardable", "single", "dp2_distopt"),  # dp_reshardable format, DP2 -> DP1
    ("tp2_distopt_from_dp2", "resume", "dp2_distopt"),  # distributed optimizer, DP2 -> TP2
    ("pp2_from_tp2", "resume", "tp2"),  # non-distributed optimizer, TP2 -> PP2 (tied embeddings on 2 stages)
])
def test_optimizer_state_reshards(runs, case, job, source):
    """Optimizer and schedule loaded at another layout: step K + 1 matches the uninterrupted run."""
    reference = runs.results["train.rank0"][source]["reference"][K]
    step = runs.results[f"{job}.rank0"][case]["step"]
    assert step["lr"] == reference["lr"]
    assert abs(step["loss"] - reference["loss"]) <= RESHARD_TOL
    assert abs(step["grad_norm"] - reference["grad_norm"]) <= RESHARD_TOL
    assert max_diff(tensors(runs, f"{case}.weights"), tensors(runs, f"{source}.reference.weights")) <= RESHARD_TOL


def test_unsupported_optimizer_loads_fail_with_a_clear_error(runs):
    error = runs.results["resume.rank0"]["tp2_distopt_from_dp2"]["dp_reshardable_error"]
    assert error is not None and "'dp_reshardable' format" in error and "tp 1 -> 2" in error, error
    error = runs.results["single.rank0"]["distopt_into_local_error"]
    assert error is not None and "distributed optimizer" in error and "optimizer=None" in error, error


def test_keep_last_and_latest(runs):
    root = runs.dir / "checkpoints"
    assert sorted(p.name for p in (root / "tp2").iterdir()) == ["iter_0000002", "latest"]  # step 1 pruned
    assert sorted(p.name for p in (root / "dp2_distopt").iterdir()) == ["iter_0000002", "latest"]
    assert (root / "tp2" / "latest").read_text() == "2\n"
    assert sorted(p.name for p in (root / "tp2" / "iter_0000002" / "rng").iterdir()) == ["rank_00000.pt",
                                                                                         "rank_00001.pt"]


def test_an_interrupted_save_is_ignored(runs, tmp_path):
    """A save that died before `latest` was updated (its iter_ directory partial) is not loaded."""
    root = tmp_path / "run"
    shutil.copytree(runs.dir / "checkpoints" / "tp2", root)
    shutil.copytree(root / "iter_0000002", root / "iter_0000003")
    (root / "iter_0000003" / "checkpoint.json").unlink()
    (root / "iter_0000004.tmp").mkdir()
    assert find_latest(root) == 2
    with pytest.raises(CheckpointError, match="iter_0000003 is incomplete or corrupt: missing checkpoint.json"):
        load_checkpoint(root, 3, [])
    (root / "latest").unlink()
    assert find_latest(root) is None
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*: it has no 'latest' file; iter_ directories for "
                                              r"steps \[2, 3\] exist but no save completed"):
        load_checkpoint(root, None, [])

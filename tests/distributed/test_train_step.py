"""RL steps of PolicyLearner in every parallel layout against the single-rank twin.

The twin (one rank) and each layout (two gloo ranks) start from the same weights and train on
the same samples for 3 steps per loss (ppo, kpo, vespo, trm), fp32. The twin pads every sample to
its own row; the `*_packed` layouts (TP2+SP, DP2, PP2, EP2) pack several into one THD row. Step losses, gradient norms
and the loss metrics must agree within 5e-5; steps 2 and 3 are off-policy (the old policy is
the initial one), so ratios, clips and masks are exercised. See step_worker.py.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from torchrun_workers import run_worker

sys.path.insert(0, str(Path(__file__).parent))
from step_worker import LOSSES, MODES  # noqa: E402

WORKER = Path(__file__).with_name("step_worker.py")
TOL = 5e-5
pytestmark = pytest.mark.distributed


def torchrun(nproc: int, out_dir: Path, *modes: str) -> None:
    run_worker(WORKER, nproc, str(out_dir), *modes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("steps")
    torchrun(1, out_dir, "reference")
    torchrun(2, out_dir, *MODES, "nan_guard")
    return {path.name.removesuffix(".json"): json.loads(path.read_text()) for path in out_dir.glob("*.json")}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_layout_matches_the_single_rank_twin(runs, mode, loss):
    kind = "moe" if MODES[mode][0].get("num_experts") else "dense"
    reference = runs["reference.rank0"][f"{kind}/{loss}"]
    for rank in (0, 1):
        result = runs[f"{mode}.rank{rank}"]
        assert "error" not in result, result["error"]
        steps = result[f"{kind}/{loss}"]
        assert len(steps) == len(reference) == 3
        for step, (got, want) in enumerate(zip(steps, reference, strict=True)):
            assert not got["skipped"] and not want["skipped"]
            assert abs(got["loss"] - want["loss"]) <= TOL, (step, got["loss"], want["loss"])
            assert abs(got["grad_norm"] - want["grad_norm"]) <= TOL, (step, got["grad_norm"], want["grad_norm"])
            assert set(got["metrics"]) == set(want["metrics"])
            for name, value in want["metrics"].items():
                assert abs(got["metrics"][name] - value) <= TOL * max(1.0, abs(value)), (step, name)


@pytest.mark.parametrize("mode", sorted(mode for mode in MODES if MODES[mode][3].get("pack_sequences")))
def test_packed_layouts_pack_several_sequences_into_a_row(runs, mode):
    """The twin pads (a row per sample); a packed layout runs one row per micro-batch with several samples in it."""
    twin = runs["reference.rank0"]["dense/ppo"][0]
    assert twin["rows"] == twin["sequences"]
    for rank in (0, 1):
        steps = runs[f"{mode}.rank{rank}"][f"{'moe' if MODES[mode][0].get('num_experts') else 'dense'}/ppo"]
        assert all(rows == 1 for rows in steps[0]["rows"]) and max(steps[0]["sequences"]) >= 2, steps[0]


def test_the_twin_does_real_work(runs):
    """Non-zero gradients every step, losses that move, and clipping on the off-policy steps."""
    reference = runs["reference.rank0"]
    for key, steps in reference.items():
        assert all(step["grad_norm"] > 1e-3 for step in steps), key
        assert len({round(step["loss"], 6) for step in steps}) == 3, key
    assert reference["dense/ppo"][2]["metrics"]["train/policy/clip_frac"] > 0
    for kind in ("dense", "moe"):
        accept = [step["metrics"]["train/trm/accept_rate"] for step in reference[f"{kind}/trm"]]
        assert any(0 < rate < 1 for rate in accept), (kind, accept)


def test_the_twin_logs_the_diagnostics(runs):
    """The diagnostics the layouts are compared on are there and not degenerate on the off-policy
    steps. (The KPO switch frequencies are 0 here: this tiny near-uniform model moves every token of
    a response the way of its advantage; the CP loss test checks them on flipping log-ratios.)"""
    reference = runs["reference.rank0"]
    for key, steps in reference.items():
        assert all(0 < step["metrics"]["train/policy/entropy"] <= math.log(128) for step in steps), key
    for kind in ("dense", "moe"):
        for step in reference[f"{kind}/kpo"][1:]:
            metrics = step["metrics"]
            assert 0 < metrics["train/kpo/x_hat_var"] < metrics["train/kpo/z_var"], metrics
            assert metrics["train/kpo/x_hat_abs_std"] > 0 and "train/kpo/z_switch_freq" in metrics
        for step in reference[f"{kind}/vespo"][1:]:
            quantiles = [step["metrics"][f"train/vespo/phi_p{level}"] for level in (10, 50, 90)]
            assert quantiles == sorted(set(quantiles)), quantiles
        rates = [value for step in reference[f"{kind}/trm"] for name, value in step["metrics"].items()
                 if name.startswith("train/trm/reject_rate_len_")]
        assert any(0 < rate < 1 for rate in rates), (kind, rates)
        assert all("train/trm/bound_unified" in step["metrics"] for step in reference[f"{kind}/trm"][1:])


def test_non_finite_logits_skip_the_step_on_every_rank(runs):
    twin_first_step = runs["reference.rank0"]["dense/ppo"][0]
    for rank in (0, 1):
        guard = runs[f"nan_guard.rank{rank}"]["nan_guard"]
        assert guard["skipped"] and guard["weights_unchanged"]
        # the NaN logits of TP rank 1 reach both ranks' log-probs through the vocab-parallel all-reduce
        assert "log_prob: " in guard["skip_reason"] and "NaN/inf value(s) on response tokens" in guard["skip_reason"]
        following = guard["next"]
        assert not following["skipped"]
        assert abs(following["loss"] - twin_first_step["loss"]) <= TOL
        assert abs(following["grad_norm"] - twin_first_step["grad_norm"]) <= TOL

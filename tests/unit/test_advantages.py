"""Outcome-reward advantage estimators against hand-computed values and per-group loops."""

import math
import statistics
from dataclasses import replace
from typing import get_args

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms.advantages import (
    broadcast_to_tokens,
    compute_advantages,
    drgrpo,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from megatron_rl.algorithms.hyperparams import AdvantageConfig, AdvantageEstimatorName

F64 = torch.float64
EPS = 1e-6
# Groups (non-contiguous ids): 5 -> rows 0, 2, 4 (1, 0, 1); 2 -> rows 1, 3 (0, 1); 9 -> row 5 alone.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=F64)
IDS = torch.tensor([5, 2, 5, 2, 5, 9])
CENTERED = [1 / 3, -0.5, -2 / 3, 0.5, 1 / 3, 0.0]  # R - mean_g by hand
STD5, STD2 = math.sqrt(1 / 3), math.sqrt(0.5)  # unbiased: (1/9 + 4/9 + 1/9) / 2, (1/4 + 1/4) / 1


def _assert_values(got: torch.Tensor, expected: list[float]) -> None:
    assert got.dtype == F64
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_grpo_by_hand():
    s5, s2 = STD5 + EPS, STD2 + EPS
    expected = [1 / 3 / s5, -0.5 / s2, -2 / 3 / s5, 0.5 / s2, 1 / 3 / s5, 0.0]
    _assert_values(grpo(REWARDS, IDS), expected)
    _assert_values(grpo(REWARDS, IDS, eps=EPS, norm_by_std=False), CENTERED)


def test_drgrpo_by_hand():
    _assert_values(drgrpo(REWARDS, IDS), CENTERED)


def test_rloo_by_hand():
    # R_i minus the mean of the other samples: 1 - (0 + 1) / 2 = 0.5, 0 - 1 = -1, ...; size 1 -> 0.
    _assert_values(rloo(REWARDS, IDS), [0.5, -1.0, -1.0, 1.0, 0.5, 0.0])


def test_reinforce_pp_by_hand():
    mean, std = statistics.fmean(REWARDS.tolist()), statistics.stdev(REWARDS.tolist())
    _assert_values(reinforce_pp(REWARDS, IDS), [(r - mean) / (std + EPS) for r in REWARDS.tolist()])


def test_reinforce_pp_baseline_by_hand():
    mean, std = statistics.fmean(CENTERED), statistics.stdev(CENTERED)
    _assert_values(reinforce_pp_baseline(REWARDS, IDS, eps=EPS), [(c - mean) / (std + EPS) for c in CENTERED])


def test_size_one_groups_and_batches_give_zero():
    r, ids = torch.tensor([3.0, -1.0, 7.0], dtype=F64), torch.tensor([0, 1, 2])
    for estimator in (grpo, drgrpo, rloo):
        assert estimator(r, ids).tolist() == [0.0, 0.0, 0.0]
    assert reinforce_pp(r[:1], ids[:1]).tolist() == [0.0]


def test_constant_group_gives_zero():
    r, ids = torch.full((4,), 0.7, dtype=F64), torch.zeros(4, dtype=torch.int64)
    for estimator in (grpo, drgrpo, rloo, reinforce_pp, reinforce_pp_baseline):
        assert estimator(r, ids).abs().max().item() < 1e-15


groups = st.lists(st.tuples(st.integers(-3, 40), st.floats(-5.0, 5.0)), min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(groups)
def test_grpo_and_rloo_match_per_group_loops(rows):
    ids = torch.tensor([g for g, _ in rows])
    r = torch.tensor([x for _, x in rows], dtype=F64)
    got_grpo, got_rloo = grpo(r, ids), rloo(r, ids)
    for i, g in enumerate(ids.tolist()):
        members = r[ids == g]
        if len(members) == 1:
            assert got_grpo[i] == 0 and got_rloo[i] == 0
            continue
        expected = (r[i] - members.mean()) / (members.std() + EPS)
        assert got_grpo[i].item() == pytest.approx(expected.item(), abs=1e-9)
        others = (members.sum() - r[i]) / (len(members) - 1)
        assert got_rloo[i].item() == pytest.approx((r[i] - others).item(), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(groups, st.randoms(use_true_random=False))
def test_permuting_samples_permutes_advantages(rows, rnd):
    ids = torch.tensor([g for g, _ in rows])
    r = torch.tensor([x for _, x in rows], dtype=F64)
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    for name in get_args(AdvantageEstimatorName):
        config = AdvantageConfig(estimator=name)
        a, b = compute_advantages(config, r, ids)[perm], compute_advantages(config, r[perm], ids[perm])
        assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_compute_advantages_dispatches_every_estimator():
    config = AdvantageConfig(eps=1e-3)
    expected = {
        "grpo": grpo(REWARDS, IDS, eps=1e-3),
        "grpo_no_std": drgrpo(REWARDS, IDS),
        "drgrpo": drgrpo(REWARDS, IDS),
        "rloo": rloo(REWARDS, IDS),
        "reinforce_pp": reinforce_pp(REWARDS, IDS, eps=1e-3),
        "reinforce_pp_baseline": reinforce_pp_baseline(REWARDS, IDS, eps=1e-3),
    }
    assert set(expected) == set(get_args(AdvantageEstimatorName))
    for name, value in expected.items():
        assert torch.equal(compute_advantages(replace(config, estimator=name), REWARDS, IDS), value)
    with pytest.raises(ValueError, match="'bogus'"):
        compute_advantages(replace(config, estimator="bogus"), REWARDS, IDS)


def test_dtypes():
    ids = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert grpo(r, ids).dtype == torch.float32
    assert grpo(r.bfloat16(), ids).dtype == torch.float32
    assert grpo(r.double(), ids).dtype == F64


def test_non_finite_reward_names_the_row():
    ids = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="row 2 is nan"):
        grpo(torch.tensor([0.0, 1.0, math.nan, math.inf]), ids)
    with pytest.raises(ValueError, match="row 1 is -inf"):
        rloo(torch.tensor([0.0, -math.inf, math.nan, 1.0]), ids)


def test_bad_shapes_and_ids():
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        grpo(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo(torch.zeros(3), torch.zeros(4, dtype=torch.int64))


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    assert broadcast_to_tokens(adv, mask).tolist() == expected
    assert broadcast_to_tokens(adv, mask.bool()).tolist() == expected
    with pytest.raises(ValueError, match="response_mask"):
        broadcast_to_tokens(adv, mask[:1])

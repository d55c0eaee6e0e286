"""The learner's finite-gradient check on DDP gradient buffers (duck-typed chunks)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_rl.learner.step import _grads_finite


def chunk(*grads):
    return SimpleNamespace(buffers=[SimpleNamespace(grad_data=g) for g in grads], expert_parallel_buffers=[])


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 3.0], True),
    ([3e38, 3e38, 3e38], True),  # the sum overflows to inf, every value is finite
    ([1.0, float("nan"), 3.0], False),
    ([1.0, float("inf"), -float("inf")], False),  # inf - inf: the sum is NaN
])
def test_grads_finite(values, finite):
    model = [chunk(torch.ones(4)), chunk(torch.tensor(values))]
    assert _grads_finite(model) is finite


def test_expert_buffers_are_checked_too():
    nan_buffer = SimpleNamespace(grad_data=torch.tensor([float("nan")]))
    expert = SimpleNamespace(buffers=[], expert_parallel_buffers=[nan_buffer])
    assert _grads_finite([expert]) is False

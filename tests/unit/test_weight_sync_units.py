"""The pure parts of weight sync: bucketing, read-back comparison, which tensors are verified, the flattened
bucket's byte layout."""

import pytest
import torch

from megatron_rl.rollout.flat_bucket import aligned_order, byte_offsets, flatten, unflatten
from megatron_rl.rollout.weight_sync import _same_values, _sample_names, buckets_of


def named(*numels: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(n)) for i, n in enumerate(numels)]  # float32: 4 bytes each


def test_buckets_keep_order_and_stay_under_the_limit():
    tensors = named(10, 10, 5, 30, 1, 1)
    buckets = list(buckets_of(tensors, bucket_bytes=100))
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4", "t5"]]


def test_a_tensor_larger_than_a_bucket_is_a_bucket_alone():
    buckets = list(buckets_of(named(1, 100, 1), bucket_bytes=8))
    assert [[name for name, _ in b] for b in buckets] == [["t0"], ["t1"], ["t2"]]


def test_read_back_matches_in_the_senders_or_a_lower_precision():
    sent = torch.tensor([0.1, 1.0 / 3.0, -2.5])
    assert _same_values(sent, sent.clone())
    assert _same_values(sent, sent.to(torch.bfloat16).float())  # an engine serving in bf16
    assert not _same_values(sent, sent + 1e-3)
    assert not _same_values(sent, sent[:2])


def test_sampled_names_include_first_and_last_and_depend_on_the_version():
    names = [f"n{i}" for i in range(50)]
    sample = _sample_names(names, 4, seed=3)
    assert sample[0] == "n0" and sample[-1] == "n49" and len(set(sample)) == 4
    assert _sample_names(names, 4, seed=3) == sample
    assert any(_sample_names(names, 4, seed=s) != sample for s in range(4, 10))
    assert _sample_names(names[:3], 4, seed=1) == names[:3]


# --- SGLang's flattened bucket (rollout/flat_bucket.py) ---

def mixed() -> list[tuple[str, torch.Tensor]]:
    """Every itemsize, odd byte counts, a scalar, an empty and a non-contiguous tensor."""
    generator = torch.Generator().manual_seed(0)
    return [("bf16_odd", torch.randn(3, generator=generator).bfloat16()),
            ("f32", torch.randn(2, 3, generator=generator)),
            ("u8", torch.randint(0, 255, (5,), generator=generator, dtype=torch.uint8)),
            ("f64_scalar", torch.tensor(1.0 / 3.0, dtype=torch.float64)),
            ("f16", torch.randn(1, 7, generator=generator).half()),
            ("empty", torch.zeros(0, 4)),
            ("transposed", torch.randn(4, 3, generator=generator).t())]


def test_flatten_is_the_bytes_back_to_back_largest_itemsize_first_and_unflattens_bitwise():
    tensors = mixed()
    flat, views = flatten(tensors)
    expected_order = ["f64_scalar", "f32", "empty", "transposed", "bf16_odd", "f16", "u8"]
    assert [name for name, _ in views] == expected_order
    by_name = dict(tensors)
    reference = torch.cat([by_name[n].contiguous().flatten().view(torch.uint8) for n in expected_order])
    assert flat.dtype == torch.uint8 and torch.equal(flat, reference)  # SGLang's tensor.flatten().view(uint8)
    names = [n for n, _ in views]
    dtypes = [v.dtype for _, v in views]
    shapes = [list(v.shape) for _, v in views]
    for (name, view), (_, back) in zip(views, unflatten(flat.clone(), names, dtypes, shapes), strict=True):
        original = by_name[name]
        assert view.dtype == back.dtype == original.dtype and view.shape == back.shape == original.shape
        assert torch.equal(view.flatten().view(torch.uint8), original.contiguous().flatten().view(torch.uint8))
        assert torch.equal(back.flatten().view(torch.uint8), original.contiguous().flatten().view(torch.uint8))
    storage = flat.untyped_storage().data_ptr()  # the kept copies are views into flat, not copies of their own
    assert all(view.untyped_storage().data_ptr() == storage for _, view in views)


def test_a_single_dtype_bucket_keeps_its_order_and_offsets_are_the_running_byte_sum():
    tensors = named(3, 1, 4)
    assert aligned_order(tensors) == tensors
    offsets, total = byte_offsets([n for n, _ in tensors], [torch.float32] * 3, [[3], [1], [4]])
    assert offsets == [0, 12, 16] and total == 32


def test_an_unaligned_layout_or_a_negative_dimension_is_refused_naming_the_tensor():
    with pytest.raises(ValueError, match=r"'w'.*offset 6, not a multiple of its itemsize 4"):
        byte_offsets(["b", "w"], [torch.bfloat16, torch.float32], [[3], [2]])
    with pytest.raises(ValueError, match=r"'n'.*negative dimension"):
        byte_offsets(["n"], [torch.float32], [[2, -1]])
    with pytest.raises(ValueError, match=r"uint8 \[8\]"):
        unflatten(torch.zeros(9, dtype=torch.uint8), ["w"], [torch.float32], [[2]])
    with pytest.raises(ValueError, match="at least one tensor"):
        flatten([])

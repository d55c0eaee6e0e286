"""The pure parts of weight sync: bucketing, read-back comparison, which tensors are verified."""

import torch

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

"""Each rollout request's sampling_seed: a function of data.seed and the request's place in the run only."""

import hashlib

from megatron_rl.trainer import rollout_seed


def test_rollout_seeds_are_the_documented_hash_and_distinct():
    expected = int.from_bytes(hashlib.sha256(b"rollout:0:37:5").digest()[:4], "little") & 0x7FFFFFFF
    assert rollout_seed(0, 37, 5) == expected
    seeds = [rollout_seed(0, draw, sample) for draw in range(2000) for sample in range(8)]
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert len(set(seeds)) >= len(seeds) - 2  # 31-bit hashes of 16000 keys: a collision is ~6 % likely
    assert [rollout_seed(1, draw, 0) for draw in range(100)] != [rollout_seed(0, draw, 0) for draw in range(100)]

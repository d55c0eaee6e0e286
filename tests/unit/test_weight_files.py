"""The "disk" transport's files: valid safetensors (read back bitwise by the safetensors library), rewritten in
place while their sizes hold, replaced without breaking views of the last push when they change, private, and
removed at close."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.rollout.weight_files import WeightFiles, safetensors_header


def mixed_bucket(seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [("norm", torch.randn(7, generator=generator).bfloat16()),
            ("weight", torch.randn(3, 5, generator=generator)),
            ("ids", torch.randint(0, 100, (3,), generator=generator)),
            ("mask", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(2.5, dtype=torch.float16))]


def test_the_files_are_safetensors_that_read_back_bitwise(tmp_path):
    files = WeightFiles(tmp_path)
    buckets = [mixed_bucket(0), [("alone", torch.arange(12.0).view(3, 4))]]
    written = files.write(buckets)
    paths = sorted(files.path.iterdir())
    assert [p.name for p in paths] == ["weights-00000.safetensors", "weights-00001.safetensors"]
    for path, bucket, views in zip(paths, buckets, written, strict=True):
        loaded = load_file(path)
        assert sorted(loaded) == sorted(name for name, _ in bucket)
        for name, tensor in bucket:
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
        assert {name: t.dtype for name, t in views} == {name: t.dtype for name, t in bucket}
    # largest itemsize first (int64, float32, then the 2-byte ones, then bool): every offset is aligned
    raw = paths[0].read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert sorted(header, key=lambda name: header[name]["data_offsets"][0]) == ["ids", "weight", "norm", "scalar",
                                                                                "mask"]
    assert [name for name, _ in written[0]] == ["ids", "weight", "norm", "scalar", "mask"]
    files.close()


def test_a_push_of_the_same_sizes_rewrites_the_same_files_and_a_shorter_one_removes_the_rest(tmp_path):
    files = WeightFiles(tmp_path)
    files.write([mixed_bucket(0), mixed_bucket(1)])
    inodes = [p.stat().st_ino for p in sorted(files.path.iterdir())]
    files.write([mixed_bucket(2), mixed_bucket(3)])
    assert [p.stat().st_ino for p in sorted(files.path.iterdir())] == inodes
    assert torch.equal(load_file(files.path / "weights-00001.safetensors")["weight"], dict(mixed_bucket(3))["weight"])
    files.write([mixed_bucket(4)])
    assert [p.name for p in files.path.iterdir()] == ["weights-00000.safetensors"]
    files.close()


def test_a_size_change_makes_a_new_file_and_the_last_views_stay_readable(tmp_path):
    files = WeightFiles(tmp_path)
    old = files.write([[("a", torch.ones(4))]])[0]
    inode = (files.path / "weights-00000.safetensors").stat().st_ino
    files.write([[("a", torch.full((8,), 2.0))]])
    assert (files.path / "weights-00000.safetensors").stat().st_ino != inode
    assert torch.equal(old[0][1], torch.ones(4))  # the old mapping is intact (a truncated one would fault)
    assert torch.equal(load_file(files.path / "weights-00000.safetensors")["a"], torch.full((8,), 2.0))
    files.close()


def test_the_directory_is_private_and_removed_at_close(tmp_path):
    files = WeightFiles(tmp_path)
    files.write([mixed_bucket(0)])
    assert files.path.parent == tmp_path and (files.path.stat().st_mode & 0o777) == 0o700
    files.close()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_read_only_dir_and_an_unwritable_dtype_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"rollout.weight_sync.disk_dir: .*missing.* not a writable directory"):
        WeightFiles(tmp_path / "missing")
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not a writable directory"):
            WeightFiles(read_only)
    with pytest.raises(ValueError, match=r"tensor 'z': dtype torch.complex64 cannot be written to safetensors"):
        safetensors_header([("z", torch.zeros(2, dtype=torch.complex64))])


def test_the_header_is_padded_to_eight_bytes_and_prefixed_with_its_length():
    header = safetensors_header([("x", torch.zeros(3))])
    length = int.from_bytes(header[:8], "little")
    assert length == len(header) - 8 and length % 8 == 0
    assert header[8:].rstrip() == b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}'

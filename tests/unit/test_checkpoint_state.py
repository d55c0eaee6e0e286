"""The parts of megatron_rl.learner.checkpoint that need no process group: finding the latest
checkpoint, refusing missing / partial / mismatched ones, pruning, RL-state and RNG round trips.
The real saves and loads are in tests/distributed/test_checkpoint.py."""

import json
import random

import numpy as np
import pytest
import torch

from megatron_rl.config import ModelConfig
from megatron_rl.learner import checkpoint
from megatron_rl.learner.checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng_state,
    find_latest,
    iter_dir,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from megatron_rl.platform import ensure_platform

ensure_platform()
from megatron.core import tensor_parallel  # noqa: E402

DEFAULT_MODEL = ModelConfig()


def fake_checkpoint(root, step: int, model_config: ModelConfig | None = DEFAULT_MODEL, latest: bool = True):
    """The files a complete checkpoint has (dist_checkpointing's are empty stand-ins)."""
    path = iter_dir(root, step)
    path.mkdir(parents=True)
    for name in ("metadata.json", ".metadata"):
        (path / name).write_text("{}")
    torch.save({"weight_version": step}, path / "rl_state.pt")
    (path / "checkpoint.json").write_text(json.dumps({
        "format": FORMAT, "step": step, "layout": {}, "scheduler": True, "optimizer": None,
        "model_config": model_config.model_dump(mode="json") if model_config else None}))
    if latest:
        (root / "latest").write_text(f"{step}\n")
    return path


def test_find_latest_reads_the_latest_file(tmp_path):
    assert find_latest(tmp_path / "absent") is None
    assert find_latest(tmp_path) is None
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 7, latest=False)  # renamed into place, `latest` not yet updated
    assert find_latest(tmp_path) == 3


def test_find_latest_refuses_a_corrupt_latest(tmp_path):
    (tmp_path / "latest").write_text("iter_3")
    with pytest.raises(CheckpointError, match="must hold a step number, got 'iter_3'"):
        find_latest(tmp_path)
    (tmp_path / "latest").write_text("5\n")
    with pytest.raises(CheckpointError, match=r"names step 5 but .*iter_0000005 does not exist"):
        find_latest(tmp_path)
    (tmp_path / "iter_0000005.replaced").mkdir()
    with pytest.raises(CheckpointError, match="iter_0000005.replaced is its previous copy.*rename it to iter_0000005"):
        find_latest(tmp_path)


def test_load_refuses_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*absent does not exist"):
        load_checkpoint(tmp_path / "absent", None, [])
    with pytest.raises(CheckpointError, match="no checkpoint in .*: it has no 'latest' file$"):
        load_checkpoint(tmp_path, None, [])
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 4 in .* \(checkpoints on disk: \[2\]\)"):
        load_checkpoint(tmp_path, 4, [])
    (iter_dir(tmp_path, 2) / "rl_state.pt").unlink()
    (iter_dir(tmp_path, 2) / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="iter_0000002 is incomplete or corrupt: missing rl_state.pt, .metadata"):
        load_checkpoint(tmp_path, None, [])


def test_load_names_the_model_config_keys_that_differ(tmp_path):
    fake_checkpoint(tmp_path, 1, ModelConfig(hidden_size=64, num_layers=2))
    now = ModelConfig(hidden_size=128, num_layers=2, vocab_size=512, hf_path="/elsewhere")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, None, [], model_config=now)
    message = str(error.value)
    assert "model.hidden_size (checkpoint 64, now 128)" in message
    assert "model.vocab_size (checkpoint 1024, now 512)" in message
    assert "num_layers" not in message and "hf_path" not in message  # same / not part of the model


def test_a_model_key_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    path = fake_checkpoint(tmp_path, 1, ModelConfig(hidden_size=64, moe_router_pre_softmax=True))
    meta = json.loads((path / "checkpoint.json").read_text())
    del meta["model_config"]["moe_router_pre_softmax"]  # saved before the key existed: built with the default
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="process group"):  # past the config check, into the (absent) group
        load_checkpoint(tmp_path, None, [], model_config=ModelConfig(hidden_size=64))
    with pytest.raises(CheckpointError, match=r"model.moe_router_pre_softmax \(checkpoint False, now True\)"):
        load_checkpoint(tmp_path, None, [], model_config=ModelConfig(hidden_size=64, moe_router_pre_softmax=True))


def test_save_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"rl_state\['buffer'\]\[1\] is a object"):
        save_checkpoint(tmp_path, 1, [], None, None, {"buffer": [1, object()]})
    with pytest.raises(TypeError, match="rl_state must be a dict, got list"):
        save_checkpoint(tmp_path, 1, [], None, None, [1])
    with pytest.raises(ValueError, match=r"rl_state\['step'\] = 3 differs from step = 1"):
        save_checkpoint(tmp_path, 1, [], None, None, {"step": 3})
    with pytest.raises(ValueError, match="keep_last must be >= 1 or None, got 0"):
        save_checkpoint(tmp_path, 1, [], None, None, {}, keep_last=0)
    with pytest.raises(ValueError, match="optimizer_format must be one of"):
        save_checkpoint(tmp_path, 1, [], None, None, {}, optimizer_format="fully_sharded_model_space")
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_the_newest_and_newer_runs(tmp_path):
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(tmp_path, step, latest=False)
    (tmp_path / "iter_0000006.tmp").mkdir()
    checkpoint._prune(tmp_path, 4, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "iter_0000005"]
    checkpoint._prune(tmp_path, 4, keep_last=None)
    assert len(list(tmp_path.iterdir())) == 3


@pytest.fixture
def tracker():
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states, seeds = tracker.get_states(), set(tracker.seeds_)
    tracker.reset()
    tracker.add("model-parallel-rng", 2718)
    yield tracker
    tracker.reset()
    tracker.set_states(states)
    tracker.seeds_ = seeds


def draws(tracker) -> list[float]:
    values = [random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(()).item()]
    with tracker.fork():
        values.append(torch.rand(()).item())
    return values


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path, tracker):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws(tracker)
    np.random.randn()  # numpy now holds a cached gaussian
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = draws(tracker)
    draws(tracker)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws(tracker) == expected

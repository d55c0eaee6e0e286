"""full_parameters: the full single-rank state from every parallel layout, against the twin.

Two torchrun launches (see export_worker.py): the single-rank twin, then the 7 layouts of
step_worker (TP2 + SP, PP2, PP2 x VPP2, CP2, DP2 with the distributed optimizer, EP2, expert-TP2)
on 2 gloo ranks. Rank 0's export must be the loaded full state bitwise, under the single-rank
names and in their order, and after 3 PPO steps the twin's trained state within 5e-5. Negative
control: merges with the shards swapped or the stride ignored get exactly the tensor-parallel
(resp. SwiGLU fc1) weights wrong. The order and merge helpers are also checked on their own.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torchrun_workers import run_worker

sys.path.insert(0, str(Path(__file__).parent))
from export_worker import MODES, NEGATIVE_CONTROL_MODES, kind_of  # noqa: E402

from megatron_rl.learner.export import Shard, merge_shards, read_plan, single_rank_order  # noqa: E402

WORKER = Path(__file__).with_name("export_worker.py")
TOL = 5e-5
TENSOR_PARALLEL = ("word_embeddings.weight", "linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight",
                   "linear_fc1.weight", "linear_fc2.weight", "output_layer.weight")


def torchrun(nproc: int, out_dir: Path, *modes: str) -> None:
    run_worker(WORKER, nproc, str(out_dir), *modes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("export")
    torchrun(1, out_dir, "reference")
    torchrun(2, out_dir, *MODES)
    return {path.name.removesuffix(".json"): json.loads(path.read_text()) for path in out_dir.glob("*.json")}


@pytest.mark.distributed
def test_one_rank_exports_its_state(runs):
    for kind, result in runs["reference.rank0"].items():
        assert result["exported_names"] == result["names"], kind
        assert result["unequal"] == [], kind
        assert result["trained_change"] > 10 * TOL, kind  # training moved the weights beyond the tolerance


@pytest.mark.distributed
@pytest.mark.parametrize("mode", sorted(MODES))
def test_layout_exports_the_full_state_bitwise_in_single_rank_order(runs, mode):
    got, other = runs[f"{mode}.rank0"], runs[f"{mode}.rank1"]
    assert "error" not in got and "error" not in other, got.get("error") or other.get("error")
    assert got["names"] == runs["reference.rank0"][kind_of(mode)]["names"]
    assert got["unequal"] == []
    assert other == {"items": 0}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", sorted(MODES))
def test_layout_exports_the_state_of_the_trained_twin(runs, mode):
    got = runs[f"{mode}.rank0"]
    assert "error" not in got, got["error"]
    assert got["trained_diff"] <= TOL, got["trained_diff"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", NEGATIVE_CONTROL_MODES)
def test_wrong_merges_are_caught(runs, mode):
    got = runs[f"{mode}.rank0"]
    assert "error" not in got, got["error"]
    names = got["names"]
    assert got["wrong_merge"]["swapped"] == [name for name in names if name.endswith(TENSOR_PARALLEL)]
    assert got["wrong_merge"]["stride1"] == [name for name in names if name.endswith("linear_fc1.weight")]
    assert any(".experts." in name for name in got["wrong_merge"]["stride1"]) == (kind_of(mode) == "moe")


def test_merge_inverts_the_strided_split():
    """count 3, stride 2: the full dim is cut into 6 pieces; shard r holds pieces r and r + 3."""
    full = torch.arange(24.0).reshape(12, 2)
    shards = [full[[0, 1, 6, 7]], full[[2, 3, 8, 9]], full[[4, 5, 10, 11]]]
    assert torch.equal(merge_shards(shards, dim=0, stride=2), full)
    assert not torch.equal(merge_shards(shards, dim=0, stride=1), full)
    assert torch.equal(merge_shards([shard.t() for shard in shards], dim=1, stride=2), full.t())


def test_order_merges_the_stages_siblings_and_sorts_numbers_as_numbers():
    last_stage = ["decoder.layers.1.norm.weight", "decoder.layers.1.mlp.experts.local_experts.10.fc.weight",
                  "decoder.layers.1.mlp.experts.local_experts.2.fc.weight", "decoder.layers.1.mlp.shared.weight",
                  "decoder.final_layernorm.weight", "output_layer.weight"]
    first_stage = ["embedding.word_embeddings.weight", "decoder.layers.0.norm.weight",
                   "decoder.layers.0.mlp.router.weight", "decoder.layers.0.mlp.experts.local_experts.2.fc.weight",
                   "decoder.layers.0.mlp.shared.weight"]
    assert single_rank_order([last_stage, first_stage]) == [
        "embedding.word_embeddings.weight",
        "decoder.layers.0.norm.weight", "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.experts.local_experts.2.fc.weight", "decoder.layers.0.mlp.shared.weight",
        "decoder.layers.1.norm.weight", "decoder.layers.1.mlp.experts.local_experts.2.fc.weight",
        "decoder.layers.1.mlp.experts.local_experts.10.fc.weight", "decoder.layers.1.mlp.shared.weight",
        "decoder.final_layernorm.weight", "output_layer.weight"]


def test_plan_reads_each_shard_from_its_lowest_holder_and_names_a_missing_one():
    def shard(name, index, count):
        return Shard(name, index, count, 0, 1, (2,), torch.float32)

    replicas = [[shard("b", 0, 1), shard("w", 0, 2)], [shard("b", 0, 1), shard("w", 1, 2)], [shard("w", 1, 2)]]
    assert read_plan(replicas) == [("b", [(0, 0)]), ("w", [(0, 1), (1, 1)])]
    with pytest.raises(RuntimeError, match=r"parameter w: shards \[1\] of 2 are held by no rank"):
        read_plan([[shard("w", 0, 2)], [shard("w", 0, 2)]])

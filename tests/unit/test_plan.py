"""megatron_rl/plan.py: rank layout, rollout nodes, parameter counts, memory estimate, `megatron-rl plan`.

The rank layout and the per-rank parameter counts are checked against real Megatron-Core: this file is
also the torchrun worker (`python -m torch.distributed.run --nproc_per_node 8 test_plan.py OUT_DIR`)
that initialises parallel_state on 8 gloo ranks in several layouts, builds the model chunks of each,
and writes every rank's coordinates and local parameter counts.
"""

import json
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from megatron_rl.config import ConfigError, config_from_dict, load_config
from megatron_rl.models.hf_config import SUPPORTED_ARCHITECTURES
from megatron_rl.plan import (
    RankPlace,
    StageParameters,
    activation_elements_per_token,
    activation_layers,
    engine_nodes,
    format_plan,
    learner_memory,
    mixed_radix,
    rank_layout,
    stage_parameters,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from torchrun_workers import run_worker  # noqa: E402

WORLD = 8
DENSE = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 24, "vocab_size": 128, "max_position_embeddings": 64, "qk_layernorm": True}
DENSE_BIASED = {**DENSE, "qk_layernorm": False, "normalization": "LayerNorm", "add_bias_linear": True,
                "swiglu": False, "untie_embeddings_and_output_weights": True}
MOE = {**DENSE, "num_layers": 2, "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
       "moe_shared_expert_intermediate_size": 48, "moe_shared_expert_gate": True,
       "untie_embeddings_and_output_weights": True}
MOE_TIED = {**MOE, "untie_embeddings_and_output_weights": False, "moe_shared_expert_intermediate_size": None}
LAYOUTS = {  # 8 ranks each
    "tp2_pp2_vpp2": (DENSE, {"tp": 2, "pp": 2, "vpp": 2}),
    "tp2_cp2_biased": (DENSE_BIASED, {"tp": 2, "cp": 2, "sequence_parallel": True}),
    "tp2_ep2_pp2": (MOE, {"tp": 2, "ep": 2, "pp": 2, "sequence_parallel": True}),
    "tp2_cp2_etp2_ep2": (MOE, {"tp": 2, "cp": 2, "etp": 2, "ep": 2, "sequence_parallel": True}),
    "ep4_pp2_tied": (MOE_TIED, {"ep": 4, "pp": 2}),
}


def run_config(model: dict, parallel: dict, world_size: int = WORLD, **sections):
    return config_from_dict({"model": model, "parallel": {**parallel, "world_size": world_size},
                             "data": {"max_prompt_length": 8, "max_response_length": 16, **sections.pop("data", {})},
                             **sections})


# ---- rank layout (pure) -------------------------------------------------------------------------------------


def test_mixed_radix_digits_fastest_first():
    assert mixed_radix(0, (2, 3, 4)) == [0, 0, 0]
    assert mixed_radix(23, (2, 3, 4)) == [1, 2, 3]
    assert mixed_radix(11, (2, 3, 4)) == [1, 2, 1]  # 11 = 1 + 2 * (2 + 3 * 1)


def test_rank_layout_by_hand_tp2_cp2_dp2_ep2():
    """tp 2 x cp 2 x dp 2: rank = tp + 2 cp + 4 dp; experts etp 1 x ep 2 x edp 4: rank = ep + 2 edp."""
    places = rank_layout(run_config(MOE, {"tp": 2, "cp": 2, "ep": 2, "sequence_parallel": True}).parallel)
    assert places[6] == RankPlace(rank=6, node=0, tp=0, cp=1, dp=1, pp=0, etp=0, ep=0, expert_dp=3)
    assert places[5] == RankPlace(rank=5, node=0, tp=1, cp=0, dp=1, pp=0, etp=0, ep=1, expert_dp=2)
    assert [p.cp for p in places] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_nodes_follow_ranks_and_must_be_whole():
    parallel = run_config(DENSE, {"tp": 2}, world_size=16).parallel
    assert [p.node for p in rank_layout(parallel, gpus_per_node=4)] == [r // 4 for r in range(16)]
    assert {p.node for p in rank_layout(run_config(DENSE, {}, world_size=4).parallel, gpus_per_node=8)} == {0}
    with pytest.raises(ConfigError) as error:
        rank_layout(run_config(DENSE, {"tp": 2}, 12, data={"rollout_batch_size": 12}).parallel, gpus_per_node=8)
    assert error.value.errors == [("parallel.world_size", "12 ranks do not fill whole nodes of 8 GPUs "
                                                          "(--gpus-per-node): use a multiple of 8")]


# ---- rollout nodes ------------------------------------------------------------------------------------------


def engines(*specs: tuple[str, int, int]) -> dict:
    return {"engines": [{"kind": "sglang", "host": host, "tp": tp, "port": port, "launch": False}
                        for host, tp, port in specs]}


def test_rollout_hosts_become_nodes_after_the_learner_in_order_of_appearance():
    cfg = run_config(DENSE, {}, world_size=16, rollout=engines(("b", 4, 1), ("a", 2, 1), ("b", 4, 2), ("a", 2, 2)))
    nodes = engine_nodes(cfg, gpus_per_node=8)
    assert [(n.node, n.host, n.engines, n.gpus) for n in nodes] == [(2, "b", (0, 2), 8), (3, "a", (1, 3), 4)]


def test_loopback_engines_share_node_0_with_the_learner():
    cfg = run_config(DENSE, {}, world_size=4, rollout=engines(("127.0.0.1", 2, 1), ("localhost", 2, 2)))
    assert [(n.node, n.engines, n.gpus) for n in engine_nodes(cfg, gpus_per_node=8)] == [(0, (0, 1), 4)]
    with pytest.raises(ConfigError) as error:
        engine_nodes(cfg, gpus_per_node=6)
    assert error.value.errors == [("rollout.engines[0]", "engines 0-1 on (rank 0's node) need 4 GPUs beside the "
                                                         "learner's 4, more than the node's 6 (--gpus-per-node)")]


def test_cpu_engines_take_no_gpu_and_a_full_node_is_refused():
    cpu = run_config(DENSE, {}, rollout={"engines": [{"kind": "cpu", "host": "127.0.0.1", "port": 1}]})
    assert [(n.node, n.gpus) for n in engine_nodes(cpu)] == [(0, 0)]
    crowded = run_config(DENSE, {}, rollout=engines(("r", 4, 1), ("r", 4, 2), ("s", 8, 1), ("r", 2, 3)))
    with pytest.raises(ConfigError) as error:
        engine_nodes(crowded, gpus_per_node=8)
    assert error.value.errors == [("rollout.engines[0]", "engines 0-1,3 on r need 10 GPUs, more than the node's 8 "
                                                         "(--gpus-per-node)")]


# ---- parameters and memory ----------------------------------------------------------------------------------


def test_stage_parameters_by_hand():
    """DENSE (h 64, 4 heads, 2 groups of d 24, f 96, V 128, qk-norm, tied) at tp 2 x pp 2: per layer
    norms 2 x 64, qkv 64 x 192 / 2, proj 96 x 64 / 2, q/k norms 2 x 24, SwiGLU 3 x 64 x 96 / 2."""
    layer = 128 + 64 * 192 // 2 + 96 * 64 // 2 + 48 + 3 * 64 * 96 // 2
    parallel = run_config(DENSE, {"tp": 2, "pp": 2}).parallel
    embedding = 128 * 64 // 2
    assert stage_parameters(run_config(DENSE, {}).model, parallel, 0) == StageParameters(2 * layer + embedding, 0)
    # the last stage: final norm + its copy of the tied embedding
    assert stage_parameters(run_config(DENSE, {}).model, parallel, 1) == StageParameters(2 * layer + 64 + embedding, 0)


def test_activation_formula_by_hand():
    """MOE at tp 2 with sequence parallelism, etp 2: 4h/2 + ((2a + 2g) d + (a + g) d) / 2 + E/2
    + k/2 (2 h etp + 3 f_e) + 3 f_s / 2 elements per token and layer; output layer h + 2 V / 2."""
    cfg = run_config(MOE, {"tp": 2, "etp": 2, "sequence_parallel": True})
    per_layer = 4 * 64 / 2 + (12 * 24 + 6 * 24) / 2 + 4 / 2 + 2 / 2 * (2 * 64 * 2 + 3 * 32) + 3 * 48 / 2
    assert activation_elements_per_token(cfg.model, cfg.parallel) == (per_layer, 64 + 128)
    dense = run_config({**DENSE, "swiglu": False}, {"tp": 2})  # no sequence parallelism: the 4h stays whole
    assert activation_elements_per_token(dense.model, dense.parallel) == (4 * 64 + (12 * 24 + 6 * 24) / 2 + 2 * 96 / 2,
                                                                          64 + 128)


@pytest.mark.parametrize(("parallel", "stages"), [
    ({}, [4]),
    ({"pp": 2}, [4, 2]),  # 1F1B: stage s holds pp - s micro-batches of its 2 layers
    ({"pp": 2, "vpp": 2}, [5, 3]),  # interleaved: 2 (pp - s - 1) + (vpp - 1) pp warm-up chunks of 1 layer, + 1
])
def test_activation_layers_in_flight(parallel, stages):
    cfg = run_config(DENSE, parallel)
    assert [activation_layers(cfg.model, cfg.parallel, s) for s in range(cfg.parallel.pp)] == stages


def test_learner_memory_adds_up():
    cfg = run_config(MOE, {"tp": 2, "ep": 4, "pp": 2, "cp": 2, "sequence_parallel": True}, world_size=16,
                     data={"max_tokens_per_micro_batch": 96})  # dp 2, expert_dp 2
    for memory in learner_memory(cfg):
        params = stage_parameters(cfg.model, cfg.parallel, memory.stage)
        assert memory.weights == memory.gradients == 4 * (params.dense + params.expert)
        assert memory.adam_distributed == round(8 * (params.dense / (2 * 2) + params.expert / 2))  # over dp x cp; edp
        assert memory.adam_replicated == 8 * (params.dense + params.expert)
        per_layer, output = activation_elements_per_token(cfg.model, cfg.parallel)
        layers = activation_layers(cfg.model, cfg.parallel, memory.stage)
        assert memory.activations == round(4 * 48 * (layers * per_layer + output * (memory.stage == 1)))
        assert memory.total == memory.weights + memory.gradients + memory.adam_distributed + memory.activations
    replicated = run_config(MOE, {"ep": 2}, optimizer={"use_distributed_optimizer": False})
    (memory,) = learner_memory(replicated)
    assert memory.total == memory.weights + memory.gradients + memory.adam_replicated + memory.activations


# ---- loading with the HF architecture -----------------------------------------------------------------------


def write_config(directory: Path, text: str) -> Path:
    path = directory / "run.yaml"
    path.write_text(text)
    return path


def test_architecture_comes_from_hf_path(tmp_path):
    hf = REPO / "configs/recipes/hf_configs/Qwen3-30B-A3B-Base"
    cfg = load_config(write_config(tmp_path, f"model: {{hf_path: {hf}, num_layers: 48}}\n"
                                                 "parallel: {tp: 2, ep: 8, sequence_parallel: true, world_size: 16}\n"))
    assert (cfg.model.num_layers, cfg.model.num_experts, cfg.model.hidden_size, cfg.parallel.ep) == (48, 128, 2048, 8)
    with pytest.raises(ConfigError) as error:  # plain load_config validates the default (dense) model
        load_config(write_config(tmp_path, "parallel: {ep: 8, world_size: 8}\n"))
    assert error.value.errors == [("parallel.ep", "must be 1 for a dense model (model.num_experts is null), got 8")]


def test_conflicting_and_unreadable_hf_architecture(tmp_path):
    hf = REPO / "configs/recipes/hf_configs/Qwen3-4B"
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, f"model: {{hf_path: {hf}, hidden_size: 1024, norm_epsilon: 1e-6}}\n"),
                        ["parallel.tp=x", "bad"])
    assert error.value.errors == [
        ("bad", "expected an override of the form dotted.key=value"),
        ("parallel.tp", "expected a valid integer, got 'x'"),
    ]
    with pytest.raises(ConfigError) as error:  # 1e-6 (a YAML string) agrees once validated; 1024 does not
        load_config(write_config(tmp_path, f"model: {{hf_path: {hf}, hidden_size: 1024, norm_epsilon: 1e-6}}\n"))
    assert error.value.errors == [("model.hidden_size", f"is 1024 but {hf}/config.json says 2560; leave it out to "
                                                        "take the checkpoint's")]
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, f"model: {{hf_path: {tmp_path}}}\n"))
    assert error.value.errors == [("model.hf_path", f"{tmp_path}/config.json does not exist: not a Hugging Face "
                                                    "checkpoint directory")]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, f"model: {{hf_path: {tmp_path}}}\n"))
    assert error.value.errors == [("model.hf_path", "HF config field 'architectures': GPT2LMHeadModel is not "
                                                    "supported; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))]


# ---- the command --------------------------------------------------------------------------------------------


def megatron_rl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_plan_command_prints_the_plan_and_refuses_bad_input(tmp_path):
    config = write_config(tmp_path, "parallel: {tp: 2, world_size: 4}\n")
    result = megatron_rl("plan", str(config), "--gpus-per-node", "4")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == format_plan(load_config(config), gpus_per_node=4)
    assert "Learner: 4 GPUs on 1 node of 4 GPUs\n" in result.stdout
    bad = megatron_rl("plan", str(config), "parallel.world_size=6", "data.rollout_batch_size=3", "--gpus-per-node", "4")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == ("parallel.world_size: 6 ranks do not fill whole nodes of 4 GPUs (--gpus-per-node): "
                          "use a multiple of 4\n")
    invalid = megatron_rl("plan", str(config), "parallel.tp=3")
    assert (invalid.returncode, invalid.stderr) == (2, "parallel.world_size: must be a multiple of tp * pp * cp = 3, "
                                                       "got 4\n")


# ---- against Megatron-Core on 8 gloo ranks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("plan")
    run_worker(Path(__file__), WORLD, str(out_dir), timeout=900)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rank_layout_and_parameters_match_megatron_core(megatron_ranks, layout):
    model, parallel = LAYOUTS[layout]
    cfg = run_config(model, parallel)
    places = rank_layout(cfg.parallel)
    for rank, result in enumerate(megatron_ranks):
        assert "error" not in result, result["error"]
        got = result[layout]
        place = places[rank]
        assert got["coordinates"] == [place.tp, place.cp, place.dp, place.pp, place.etp, place.ep, place.expert_dp]
        params = stage_parameters(cfg.model, cfg.parallel, place.pp)
        assert (got["dense"], got["expert"]) == (params.dense, params.expert), (layout, rank)


@pytest.mark.distributed
def test_the_layouts_are_not_trivial(megatron_ranks):
    """Negative control: every coordinate takes more than one value in some layout, and the layouts
    disagree with a naive tp-dp-pp order (which ignores cp and the expert order)."""
    coordinates = [result[layout]["coordinates"] for result in megatron_ranks for layout in LAYOUTS]
    assert all(len({c[i] for c in coordinates}) > 1 for i in range(7))
    cfg = run_config(*LAYOUTS["tp2_cp2_etp2_ep2"])
    naive = [mixed_radix(rank, (cfg.parallel.tp, cfg.parallel.dp, cfg.parallel.cp)) for rank in range(WORLD)]
    assert [result["tp2_cp2_etp2_ep2"]["coordinates"][2] for result in megatron_ranks] != [n[1] for n in naive]


def _worker(out_dir: Path) -> None:
    """torchrun worker: every layout of LAYOUTS on this rank; writes out_dir/rank<r>.json."""
    import os

    import torch

    from megatron_rl.parallel.state import initialize_parallel
    from megatron_rl.platform import ensure_platform

    ensure_platform()  # before the first Megatron-Core import
    from megatron.core import parallel_state as ps

    from megatron_rl.learner.model import build_model_chunks

    torch.set_num_threads(1)
    rank, out = int(os.environ["RANK"]), {}
    try:
        for name, (model, parallel) in LAYOUTS.items():
            cfg = run_config(model, parallel)
            initialize_parallel(cfg.parallel)
            chunks = build_model_chunks(cfg.model, cfg.parallel)
            params = [p for chunk in chunks for p in chunk.parameters()]
            out[name] = {
                "coordinates": [ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
                                ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                ps.get_expert_tensor_parallel_rank(), ps.get_expert_model_parallel_rank(),
                                ps.get_expert_data_parallel_rank()],
                "dense": sum(p.numel() for p in params if getattr(p, "allreduce", True)),
                "expert": sum(p.numel() for p in params if not getattr(p, "allreduce", True)),
            }
            ps.destroy_model_parallel()  # the process group stays for the next layout
    except Exception:
        out["error"] = traceback.format_exc()
        raise
    finally:
        (out_dir / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

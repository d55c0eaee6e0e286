"""megatron_rl.models: Hugging Face <-> Megatron-Core names, layouts and configs, against the real models.

Tiny random transformers models, fp32: Llama (tied embeddings), Qwen2 (q/k/v biases, untied,
theta 1e6), Qwen3 (q/k RMSNorm, head_dim 24 != hidden / heads, tied), Qwen3-MoE (4 experts, top-2,
norm_topk_prob, untied; and without norm_topk_prob: softmax before the top-k) and Qwen2-MoE (q/k/v
biases, a shared expert with its sigmoid gate, no norm_topk_prob). Every parameter is drawn from a
seeded generator (norm weights around 1, biases non-zero), so a misplaced tensor shows. Each model is
saved with save_pretrained, read back with SafetensorsCheckpoint, converted with hf_to_megatron and
loaded (load_full_state) into a single-rank build_gpt_model on a gloo world of one process; both
models then score the same tokens.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from single_process import single_process_megatron
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.models.hf_checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsCheckpoint,
    iter_safetensors,
    write_safetensors,
)
from megatron_rl.models.hf_config import read_hf_config
from megatron_rl.models.hf_mapping import hf_names, hf_to_megatron, megatron_to_hf, model_config_from_hf, rules
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402

from megatron_rl.learner.full_weights import full_name, load_full_state  # noqa: E402
from megatron_rl.learner.model import build_gpt_model  # noqa: E402

SEED = 20240611
LOGIT_TOLERANCE = 1e-5
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}
ARCHITECTURES = {
    "llama": {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    "qwen2": {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "qwen3": {"tie_word_embeddings": True, "head_dim": 24},
    "qwen3_moe": {"tie_word_embeddings": False, "head_dim": 24, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "norm_topk_prob": True},
    "qwen2_moe": {"tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
}
VARIANTS = {"qwen3_moe_pre_softmax": ("qwen3_moe", {"norm_topk_prob": False})}  # case: (model_type, overrides)
CASES = [*ARCHITECTURES, *VARIANTS]
TOKENS = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def megatron_world():
    """Megatron's parallel state on a gloo world of this one process."""
    with single_process_megatron(SEED):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> (transformers model, its save_pretrained directory), built on first use."""
    built = {}

    def get(case: str):
        if case not in built:
            config = AutoConfig.for_model(**hf_fields(case))
            model = AutoModelForCausalLM.from_config(config).eval()
            randomise(model, SEED)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            built[case] = model, path
        return built[case]
    return get


def hf_fields(case: str) -> dict:
    model_type, overrides = VARIANTS.get(case, (case, {}))
    return {"model_type": model_type, **COMMON, **ARCHITECTURES[model_type], **overrides}


def randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 1:  # biases
                param.copy_(0.2 * noise)
            else:  # weights [.., out, in]
                param.copy_(noise / param.shape[-1] ** 0.5)


def hf_logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(TOKENS).logits


def megatron_logits(model: ModelConfig, full_state: dict[str, torch.Tensor]) -> torch.Tensor:
    megatron = build_gpt_model(model, ParallelConfig())
    assert list(full_state) == [name for name, _ in megatron.named_parameters()]
    assert load_full_state([megatron], full_state) > 0
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        return megatron(TOKENS, positions, None)


def converted(path, te_names: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    model = ModelConfig(**model_config_from_hf(read_hf_config(path)))
    return model, dict(hf_to_megatron(SafetensorsCheckpoint(path), model, te_names=te_names))


@pytest.mark.parametrize("case", CASES)
def test_megatron_logits_equal_transformers(megatron_world, checkpoints, case):
    hf_model, path = checkpoints(case)
    model, full_state = converted(path)
    assert model.untie_embeddings_and_output_weights == (not hf_fields(case)["tie_word_embeddings"])
    expected = hf_logits(hf_model)
    difference = (megatron_logits(model, full_state) - expected).abs().max().item()
    print(f"{case}: max |logit diff| = {difference:.2e}, logit scale {expected.abs().max().item():.2f}")
    assert difference <= LOGIT_TOLERANCE


@pytest.mark.parametrize("case", ["qwen2_moe", "qwen3_moe"])
def test_the_other_router_changes_the_logits(megatron_world, checkpoints, case):
    hf_model, path = checkpoints(case)
    model, full_state = converted(path)
    flipped = model.model_copy(update={"moe_router_pre_softmax": not model.moe_router_pre_softmax})
    difference = (megatron_logits(flipped, full_state) - hf_logits(hf_model)).abs().max().item()
    print(f"{case} with moe_router_pre_softmax = {flipped.moe_router_pre_softmax}: max |logit diff| = "
          f"{difference:.2e}")
    assert difference > 1e-3


def concatenated_qkv(model: ModelConfig, full_state: dict, path) -> dict:
    """The fused QKV as [q; k; v] instead of Megatron's per-group interleave."""
    checkpoint, wrong = SafetensorsCheckpoint(path), dict(full_state)
    for layer in range(model.num_layers):
        for kind in ("weight", "bias"):
            wrong[f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = torch.cat(
                [checkpoint[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
    return wrong


def swapped_gate_up(model: ModelConfig, full_state: dict, path) -> dict:
    """fc1 as [up; gate] instead of [gate; up]."""
    wrong = dict(full_state)
    for layer in range(model.num_layers):
        gate, up = full_state[f"decoder.layers.{layer}.mlp.linear_fc1.weight"].chunk(2)
        wrong[f"decoder.layers.{layer}.mlp.linear_fc1.weight"] = torch.cat([up, gate])
    return wrong


@pytest.mark.parametrize("corrupt", [concatenated_qkv, swapped_gate_up])
def test_wrong_layouts_change_the_logits(megatron_world, checkpoints, corrupt):
    hf_model, path = checkpoints("qwen2")
    model, full_state = converted(path)
    difference = (megatron_logits(model, corrupt(model, full_state, path)) - hf_logits(hf_model)).abs().max().item()
    print(f"{corrupt.__name__}: max |logit diff| = {difference:.2e}")
    assert difference > 1e-3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("te_names", [False, True])
def test_round_trip_is_bitwise(checkpoints, case, te_names):
    _, path = checkpoints(case)
    checkpoint = SafetensorsCheckpoint(path)
    model, full_state = converted(path, te_names)
    back = {}
    for name, tensor in full_state.items():
        for hf_name, hf_tensor in megatron_to_hf(name, tensor, model):
            assert hf_name not in back, f"{hf_name} produced twice"
            back[hf_name] = hf_tensor
    assert list(back) == hf_names(model)
    assert set(back) == set(checkpoint)
    for name, tensor in back.items():
        assert tensor.dtype == checkpoint[name].dtype and torch.equal(tensor, checkpoint[name]), name


def test_shared_experts_of_a_real_megatron_model_round_trip(megatron_world):
    """A Megatron MoE with an ungated shared expert (no HF architecture has one to compare with)."""
    model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                        vocab_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
                        qk_layernorm=True, add_qkv_bias=True, untie_embeddings_and_output_weights=True)
    megatron = dict(build_gpt_model(model, ParallelConfig()).named_parameters())
    hf = dict(pair for name, param in megatron.items() for pair in megatron_to_hf(name, param.detach(), model))
    assert list(hf) == hf_names(model)
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in hf
    again = dict(hf_to_megatron(hf, model, te_names=False))
    assert list(again) == list(megatron)
    assert all(torch.equal(again[name], param) for name, param in megatron.items())


def test_transformer_engine_names():
    """Only the fused norms and the grouped-GEMM experts are named differently (Megatron's TE layer spec)."""
    dense = ModelConfig(num_layers=1, qk_layernorm=True)
    local, te = ({rule.megatron for rule in rules(dense, te_names)} for te_names in (False, True))
    keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map  # Megatron's local -> TE names
    renamed = {f"decoder.layers.0.{old}weight": f"decoder.layers.0.{new}weight" for old, new in keys_map.items()}
    assert local - te == set(renamed) == {"decoder.layers.0.input_layernorm.weight",
                                          "decoder.layers.0.pre_mlp_layernorm.weight"}
    assert te - local == set(renamed.values())

    moe = ModelConfig(num_layers=1, num_experts=2, moe_router_topk=1)
    local, te = ({rule.megatron for rule in rules(moe, te_names)} for te_names in (False, True))
    layer = "decoder.layers.0."
    assert local - te == {layer + "input_layernorm.weight"} | {
        layer + f"mlp.experts.local_experts.{j}.linear_fc{k}.weight" for j in range(2) for k in (1, 2)}
    assert te - local == {layer + "self_attention.linear_qkv.layer_norm_weight"} | {
        layer + f"mlp.experts.linear_fc{k}.weight{j}" for j in range(2) for k in (1, 2)}
    assert layer + "pre_mlp_layernorm.weight" in te  # TE's MoE layer keeps a separate TENorm


def test_full_names_of_expert_parallel_experts_in_both_specs():
    """A rank of PP2 x EP2: the second stage (model layers 2, 3), experts 2 and 3 of 4 (local 0 and 1). Local
    names of both layer specs map to full names the mapping knows (full_weights.full_name; TE is not installed
    here, so the chunk is a stand-in with the attributes full_name reads)."""
    def layer(number):
        return SimpleNamespace(layer_number=number, mlp=SimpleNamespace(local_expert_indices=[2, 3]))

    chunk = SimpleNamespace(decoder=SimpleNamespace(layers=[layer(3), layer(4)]))
    te_names = {
        "decoder.layers.1.mlp.experts.linear_fc1.weight0": "decoder.layers.3.mlp.experts.linear_fc1.weight2",
        "decoder.layers.0.mlp.experts.linear_fc2.weight1": "decoder.layers.2.mlp.experts.linear_fc2.weight3",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight":
            "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
    }
    local_names = {
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight":
            "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight",
        "decoder.layers.1.mlp.router.weight": "decoder.layers.3.mlp.router.weight",
        "decoder.layers.0.mlp.shared_experts.gate_weight": "decoder.layers.2.mlp.shared_experts.gate_weight",
        "decoder.layers.1.mlp.shared_experts.linear_fc2.weight":
            "decoder.layers.3.mlp.shared_experts.linear_fc2.weight",
    }
    model = ModelConfig(num_layers=4, num_experts=4, moe_shared_expert_intermediate_size=32,
                        moe_shared_expert_gate=True)
    for names, te in ((te_names, True), (local_names, False)):
        assert {local: full_name(chunk, local, ()) for local in names} == names
        assert set(names.values()) <= {rule.megatron for rule in rules(model, te)}


def test_written_checkpoint_loads_in_transformers(checkpoints, tmp_path):
    hf_model, path = checkpoints("qwen3_moe")
    model, full_state = converted(path)
    named = (pair for name, tensor in full_state.items() for pair in megatron_to_hf(name, tensor, model))
    out = write_safetensors(tmp_path / "export", named, max_shard_bytes=64 * 1024,
                            extra_files={"config.json": (path / "config.json").read_text()})
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in SafetensorsCheckpoint(path).values())
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging directory left
    assert dict(iter_safetensors(out)).keys() == set(hf_names(model))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(hf_logits(reloaded), hf_logits(hf_model))


def test_missing_unexpected_and_misshapen_tensors_are_named(checkpoints):
    _, path = checkpoints("qwen3")
    model = ModelConfig(**model_config_from_hf(read_hf_config(path)))
    tensors = dict(SafetensorsCheckpoint(path))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    with pytest.raises(ValueError, match=r"1 missing \['model\.layers\.1\.self_attn\.k_norm\.weight'\], "
                                         r"0 unexpected \[\]"):
        hf_to_megatron(missing, model, te_names=False)
    with pytest.raises(ValueError, match=r"0 missing \[\], 1 unexpected \['model\.layers\.0\.mlp\.extra\.weight'\]"):
        hf_to_megatron(tensors | {"model.layers.0.mlp.extra.weight": torch.zeros(1)}, model, te_names=False)
    misshapen = tensors | {"model.layers.1.self_attn.k_proj.weight": torch.zeros(40, 64)}
    with pytest.raises(ValueError, match=r"HF tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape "
                                         r"\(40, 64\), the model expects \(48, 64\)"):
        list(hf_to_megatron(misshapen, model, te_names=False))


def test_tied_lm_head_copies_and_rope_buffers_are_accepted(checkpoints):
    _, path = checkpoints("llama")
    model = ModelConfig(**model_config_from_hf(read_hf_config(path)))
    tensors = dict(SafetensorsCheckpoint(path))
    assert "lm_head.weight" not in tensors
    extras = {"lm_head.weight": tensors["model.embed_tokens.weight"].clone(),
              "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert list(hf_to_megatron(tensors | extras, model, te_names=False)) != []
    extras["lm_head.weight"] = extras["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        hf_to_megatron(tensors | extras, model, te_names=False)


def test_megatron_to_hf_refuses_unknown_names_and_shapes():
    model = ModelConfig(num_layers=2, num_query_groups=2)
    with pytest.raises(ValueError, match=r"'decoder\.layers\.2\.input_layernorm\.weight' is not a full Megatron"):
        megatron_to_hf("decoder.layers.2.input_layernorm.weight", torch.zeros(64), model)
    with pytest.raises(ValueError, match=r"'decoder\.layers\.0\.self_attention\.linear_qkv\.weight' has shape "
                                         r"\(192, 64\), the model expects \(128, 64\)"):
        megatron_to_hf("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(192, 64), model)
    with pytest.raises(ValueError, match=r"model\.normalization = 'LayerNorm' has no Hugging Face mapping"):
        hf_names(ModelConfig(normalization="LayerNorm"))


def test_qkv_layout_is_megatrons_per_group_interleave():
    """4 heads in 2 groups of head_dim 1: rows q0 q1 k0 v0 q2 q3 k1 v1."""
    model = ModelConfig(num_layers=1, hidden_size=4, ffn_hidden_size=8, num_attention_heads=4, num_query_groups=2,
                        kv_channels=1, vocab_size=8)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    qkv = torch.tensor([[0.0], [1], [10], [20], [2], [3], [11], [21]]).expand(8, 4)
    rule = next(r for r in rules(model, False) if r.megatron.endswith("linear_qkv.weight"))
    split = dict(megatron_to_hf(rule.megatron, qkv, model))
    assert [split[name][:, 0].tolist() for name in rule.hf] == [q[:, 0].tolist(), k[:, 0].tolist(), v[:, 0].tolist()]


def test_model_config_from_hf_reads_every_field(checkpoints):
    hf_model, path = checkpoints("qwen3_moe")
    fields = model_config_from_hf(read_hf_config(path))
    assert fields == {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
        "kv_channels": 24, "vocab_size": 128, "max_position_embeddings": 64, "rotary_base": 10000.0,
        "norm_epsilon": 1e-6, "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
        "qk_layernorm": True, "add_qkv_bias": False, "untie_embeddings_and_output_weights": True,
        "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": False}
    assert model_config_from_hf(hf_model.config) == fields
    legacy = read_hf_config(path)  # a config.json as older transformers wrote it
    legacy["rope_theta"] = legacy.pop("rope_parameters")["rope_theta"]
    legacy["num_experts"] = legacy.pop("num_local_experts")
    assert model_config_from_hf(legacy) == fields


def test_model_config_from_hf_reads_the_router_and_the_shared_expert_gate():
    qwen2_moe = model_config_from_hf(hf_dict("qwen2_moe"))
    assert {key: qwen2_moe[key] for key in ("add_qkv_bias", "moe_router_pre_softmax", "moe_shared_expert_gate",
                                            "moe_shared_expert_intermediate_size", "moe_ffn_hidden_size")} == {
        "add_qkv_bias": True, "moe_router_pre_softmax": True, "moe_shared_expert_gate": True,
        "moe_shared_expert_intermediate_size": 48, "moe_ffn_hidden_size": 32}
    assert model_config_from_hf(hf_dict("qwen2_moe", qkv_bias=False))["add_qkv_bias"] is False
    assert model_config_from_hf(hf_dict("qwen2_moe", norm_topk_prob=True))["moe_router_pre_softmax"] is False
    assert model_config_from_hf(hf_dict("qwen3_moe", norm_topk_prob=False))["moe_router_pre_softmax"] is True
    assert "moe_shared_expert_gate" not in model_config_from_hf(hf_dict("qwen3_moe"))


def hf_dict(model_type: str, **overrides) -> dict:
    return AutoConfig.for_model(model_type, **COMMON, **ARCHITECTURES[model_type]).to_dict() | overrides


SUPPORTED = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM"


@pytest.mark.parametrize("config, message", [
    (hf_dict("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "'rope_parameters.rope_type' = 'llama3' is not supported"),
    ({**hf_dict("qwen2", rope_theta=1e6), "rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
     "'rope_scaling.rope_type' = 'yarn' is not supported"),
    (hf_dict("qwen2", partial_rotary_factor=0.5), "'partial_rotary_factor' = 0.5 is not supported"),
    (hf_dict("qwen2", layer_types=["full_attention", "sliding_attention"]), "'layer_types' = .* only full attention"),
    ({**hf_dict("qwen2", use_sliding_window=True), "layer_types": None}, "'use_sliding_window' = True"),
    (hf_dict("qwen2", architectures=["MistralForCausalLM"]),
     f"'architectures': MistralForCausalLM is not supported; supported: {SUPPORTED}"),
    (hf_dict("qwen3_moe", architectures=["MixtralForCausalLM"]), "MixtralForCausalLM is not supported"),
    ({**hf_dict("qwen3"), "model_type": "gemma"}, f"'model_type': 'gemma' is not supported; supported .*{SUPPORTED}"),
    (hf_dict("qwen2_moe", decoder_sparse_step=2), "'decoder_sparse_step' = 2 is not supported"),
    (hf_dict("qwen3_moe", mlp_only_layers=[1]), r"'mlp_only_layers' = \[1\] is not supported"),
    (hf_dict("qwen3_moe", decoder_sparse_step=2), "'decoder_sparse_step' = 2 is not supported"),
    (hf_dict("llama", attention_bias=True), "'attention_bias' = True is not supported .*o_proj"),
    (hf_dict("llama", mlp_bias=True), "'mlp_bias' = True is not supported"),
    (hf_dict("qwen3", hidden_act="gelu"), "'hidden_act' = 'gelu' is not supported"),
    (hf_dict("qwen3", hidden_size=None), "HF config has no field 'hidden_size'"),
], ids=lambda value: None if isinstance(value, dict) else value[:40])
def test_unsupported_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(config)


def test_write_safetensors_single_file_and_refusals(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    out = write_safetensors(tmp_path / "one", iter(tensors.items()), max_shard_bytes=1 << 20)
    assert sorted(os.listdir(out)) == [SINGLE_FILE]
    read = dict(iter_safetensors(out))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
    assert read["b"].dtype == torch.bfloat16
    views = torch.arange(8.0).split(4)  # views sharing one storage
    assert torch.equal(dict(iter_safetensors(write_safetensors(tmp_path / "views", [("x", views[0]),
                                                                                   ("y", views[1])], 16)))["y"],
                       views[1])
    with pytest.raises(FileExistsError, match="already exists"):
        write_safetensors(out, iter(tensors.items()), max_shard_bytes=1 << 20)
    with pytest.raises(ValueError, match="'a' is given twice"):
        write_safetensors(tmp_path / "twice", [("a", torch.ones(1)), ("a", torch.ones(1))], max_shard_bytes=4)

    def failing():
        yield "a", torch.ones(1000)
        yield "b", torch.ones(1000)
        raise RuntimeError("source failed")
    with pytest.raises(RuntimeError, match="source failed"):
        write_safetensors(tmp_path / "failed", failing(), max_shard_bytes=4000)
    assert sorted(os.listdir(tmp_path)) == ["one", "views"]  # nothing of the failed or refused writes


def test_reading_refuses_what_is_not_a_safetensors_checkpoint(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor .*found: \['pytorch_model\.bin'\]"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        read_hf_config(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names shard model-00001-of-00002.safetensors, which does not exist"):
        SafetensorsCheckpoint(tmp_path)

"""A Hugging Face model config -> the architecture fields of our ModelConfig.

    fields = model_config_from_hf(read_hf_config(path))   # or a transformers.PretrainedConfig
    model = ModelConfig(**fields)

Accepts both a raw config.json (legacy keys: `rope_theta`, `rope_scaling`, `num_experts`) and
transformers 5's config dicts (`rope_parameters`, `num_local_experts`). Anything the Megatron model
would compute differently is refused with a ValueError naming the Hugging Face field:

- RoPE: only the plain rotary embedding over the whole head (rope_type "default", no
  partial_rotary_factor). Megatron's non-interleaved RoPE rotates halves [x1, x2] -> [x1 c - x2 s,
  x2 c + x1 s] with inv_freq_i = theta^(-2i / head_dim), as HF's rotate_half does.
- attention: full causal attention in every layer (no sliding window); biases on q, k, v only
  (Qwen2: always; Qwen2-MoE: `qkv_bias`, default true; Llama / Qwen3 `attention_bias` would also
  bias o_proj, which Megatron's add_qkv_bias does not).
- MLP: SwiGLU (`hidden_act` silu), no biases.
- MoE (Qwen2-MoE, Qwen3-MoE): every layer sparse. The router takes the softmax over all experts
  and keeps the top k; `norm_topk_prob: true` renormalises those k, which is Megatron's softmax
  over the top-k logits (moe_router_pre_softmax false); `norm_topk_prob: false` keeps them as they
  are (moe_router_pre_softmax true). Qwen2-MoE adds a shared expert of
  `shared_expert_intermediate_size`, its output scaled by sigmoid(x . shared_expert_gate)
  (moe_shared_expert_gate).
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_hf_config(directory: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict."""
    path = Path(directory, "config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


SUPPORTED_ARCHITECTURES = {  # architecture -> model_type
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
QK_LAYERNORM = {"qwen3", "qwen3_moe"}
QKV_BIAS = {"qwen2"}  # always; Qwen2-MoE: its `qkv_bias` field
MOE = {"qwen2_moe", "qwen3_moe"}
SHARED_EXPERT = {"qwen2_moe"}


def model_config_from_hf(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """ModelConfig fields for a Hugging Face config (a dict, or anything with `to_dict()`)."""
    config = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    model_type = _model_type(config)
    heads = _required(config, "num_attention_heads")
    hidden = _required(config, "hidden_size")
    _refuse_unless(config, "hidden_act", "silu", "only SwiGLU MLPs are supported")
    _refuse_unless(config, "attention_bias", False, "Megatron's add_qkv_bias biases q, k, v but not o_proj")
    _refuse_unless(config, "mlp_bias", False, "the MLP has no biases")
    _check_full_attention(config)
    fields = {
        "num_layers": _required(config, "num_hidden_layers"),
        "hidden_size": hidden,
        "ffn_hidden_size": _required(config, "intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "kv_channels": config.get("head_dim") or hidden // heads,
        "vocab_size": _required(config, "vocab_size"),
        "max_position_embeddings": _required(config, "max_position_embeddings"),
        "rotary_base": _rotary_base(config),
        "norm_epsilon": _required(config, "rms_norm_eps"),
        "normalization": "RMSNorm",
        "swiglu": True,
        "add_bias_linear": False,
        "qk_layernorm": model_type in QK_LAYERNORM,
        "add_qkv_bias": model_type in QKV_BIAS or (model_type == "qwen2_moe" and config.get("qkv_bias", True)),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
    }
    if model_type in MOE:
        fields |= _moe_fields(config)
    if model_type in SHARED_EXPERT:
        fields |= {"moe_shared_expert_intermediate_size": _required(config, "shared_expert_intermediate_size"),
                   "moe_shared_expert_gate": True}
    return fields


def _model_type(config: dict) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = config.get("architectures") or []
    if len(architectures) > 1:
        raise ValueError(f"HF config field 'architectures' names several: {architectures}; expected one of {supported}")
    if architectures:
        if architectures[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"HF config field 'architectures': {architectures[0]} is not supported; "
                             f"supported: {supported}")
        return SUPPORTED_ARCHITECTURES[architectures[0]]
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise ValueError(f"HF config field 'model_type': {model_type!r} is not supported; "
                         f"supported architectures: {supported}")
    return model_type


def _required(config: dict, field: str) -> Any:
    if config.get(field) is None:
        raise ValueError(f"HF config has no field {field!r}")
    return config[field]


def _refuse_unless(config: dict, field: str, supported: Any, why: str) -> None:
    value = config.get(field, supported)
    if value != supported:
        raise ValueError(f"HF config field {field!r} = {value!r} is not supported ({why}); expected {supported!r}")


def _check_full_attention(config: dict) -> None:
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(f"HF config field 'layer_types' = {layer_types} is not supported: only full attention "
                             "(no sliding window) is implemented")
        return
    _refuse_unless(config, "use_sliding_window", False, "only full attention is implemented")


def _rotary_base(config: dict) -> float:
    """RoPE theta from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (config.json)."""
    field = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    rope = config.get(field) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"HF config field '{field}.rope_type' = {rope_type!r} is not supported: only the default "
                         "RoPE is implemented (no llama3 / yarn / linear / dynamic scaling)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"HF config field 'partial_rotary_factor' = {partial} is not supported: RoPE must rotate "
                         "the whole head (1.0)")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("HF config has no RoPE theta: neither 'rope_parameters.rope_theta' nor 'rope_theta'")
    return float(theta)


def _moe_fields(config: dict) -> dict[str, Any]:
    _refuse_unless(config, "decoder_sparse_step", 1, "every layer must be a MoE layer")
    if config.get("mlp_only_layers"):
        raise ValueError(f"HF config field 'mlp_only_layers' = {config['mlp_only_layers']} is not supported: "
                         "every layer must be a MoE layer")
    experts_field = "num_experts" if config.get("num_experts") is not None else "num_local_experts"
    return {
        "num_experts": _required(config, experts_field),
        "moe_router_topk": _required(config, "num_experts_per_tok"),
        "moe_ffn_hidden_size": _required(config, "moe_intermediate_size"),
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not config.get("norm_topk_prob", False),  # transformers' default: false
    }

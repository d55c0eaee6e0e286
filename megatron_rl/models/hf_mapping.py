"""Hugging Face <-> Megatron-Core parameter names, shapes and layouts: the one place that knows them.

    fields = model_config_from_hf(read_hf_config(path))                   # ModelConfig(**fields)
    full_state = dict(hf_to_megatron(SafetensorsCheckpoint(path), model, te_names=False))
    for name, tensor in full_state.items():                               # export / weight sync, streamed
        for hf_name, hf_tensor in megatron_to_hf(name, tensor, model): ...
    hf_names(model)                                                       # every HF tensor, fixed order

Megatron names are full (single-rank) names: layer i of the whole model, expert j of all experts
(learner.full_weights.full_name turns a rank's local names into them). Megatron-Core names a few
parameters differently in its two layer specs; megatron_to_hf accepts both:

    local spec (CPU)                                   Transformer Engine spec (GPU)
    layers.i.input_layernorm.weight                    layers.i.self_attention.linear_qkv.layer_norm_weight
    layers.i.pre_mlp_layernorm.weight (dense layer)    layers.i.mlp.linear_fc1.layer_norm_weight
    layers.i.mlp.experts.local_experts.j.linear_fc1.weight   layers.i.mlp.experts.linear_fc1.weightj
(a MoE layer keeps pre_mlp_layernorm.weight in both; everything else is named alike).

Layouts, with h = hidden_size, d = kv_channels, n_q heads, n_g query groups, I = an FFN size:
- self_attention.linear_qkv.weight [(n_q + 2 n_g) d, h] (and its bias): for each query group g in
  turn, the n_q / n_g query heads of g, then key head g, then value head g, so that a tensor-parallel
  rank's contiguous slice holds whole groups. HF: q_proj [n_q d, h], k_proj and v_proj [n_g d, h].
- linear_fc1.weight [2 I, h] = [gate_proj; up_proj]: Megatron's GLU is silu(first half) * second half.
- every other Megatron tensor is one HF tensor, unchanged.
HF names are those of the safetensors files, which rollout engines load: experts one by one
(mlp.experts.j.{gate,up,down}_proj.weight), shared experts as Qwen2-MoE's mlp.shared_expert.*, and
their sigmoid gate (model.moe_shared_expert_gate) mlp.shared_experts.gate_weight [1, h] as
mlp.shared_expert_gate.weight.
"""

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_rl.config import ModelConfig
from megatron_rl.models.hf_config import model_config_from_hf

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"
TIED_LM_HEAD = "lm_head.weight"  # some checkpoints of tied models store it, equal to the embedding
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # RoPE buffers of old checkpoints


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of (joined by `join`)."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    join: Literal["copy", "qkv", "gate_up"] = COPY

    @property
    def megatron_shape(self) -> tuple[int, ...]:
        """Every join stacks its HF tensors along dim 0."""
        return (sum(shape[0] for shape in self.hf_shapes), *self.hf_shapes[0][1:])


def hf_names(model: ModelConfig) -> list[str]:
    """Every HF tensor name of the model, in a fixed order (embedding, layers, final norm, lm_head)."""
    return [name for rule in rules(model, te_names=False) for name in rule.hf]


def hf_to_megatron(hf_tensors: Mapping[str, torch.Tensor], model: ModelConfig,
                   te_names: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(full Megatron name, tensor) for every parameter, read from the HF tensors one rule at a time.

    `hf_tensors` may be lazy (SafetensorsCheckpoint): only its keys are read up front, where a missing
    or unexpected name raises ValueError; a wrong shape raises ValueError when that tensor is reached.
    """
    rule_list = rules(model, te_names)
    expected = {name: shape for rule in rule_list for name, shape in zip(rule.hf, rule.hf_shapes, strict=True)}
    present = {name for name in hf_tensors.keys() if not IGNORED_HF.fullmatch(name)}
    tied_copy = not model.untie_embeddings_and_output_weights and TIED_LM_HEAD in present
    _check_names(present - {TIED_LM_HEAD} if tied_copy else present, expected)
    if tied_copy and not torch.equal(hf_tensors[TIED_LM_HEAD], hf_tensors["model.embed_tokens.weight"]):
        raise ValueError(f"the model ties its embeddings, but the HF tensor {TIED_LM_HEAD!r} differs from "
                         "'model.embed_tokens.weight' (set untie_embeddings_and_output_weights)")
    return ((rule.megatron, _join(rule, [_checked(name, hf_tensors[name], shape)
                                         for name, shape in zip(rule.hf, rule.hf_shapes, strict=True)], model))
            for rule in rule_list)


def megatron_to_hf(name: str, tensor: torch.Tensor, model: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one full Megatron tensor (either naming scheme); the inverse of hf_to_megatron.

    The returned tensors may be views of `tensor`.
    """
    rule = _rules_by_megatron_name(model).get(name)
    if rule is None:
        raise ValueError(f"{name!r} is not a full Megatron parameter name of this model (local or Transformer "
                         "Engine spec; learner.full_weights.full_name gives full names)")
    if tuple(tensor.shape) != rule.megatron_shape:
        raise ValueError(f"Megatron tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                         f"{rule.megatron_shape}")
    return list(zip(rule.hf, _split(rule, tensor, model), strict=True))


@functools.lru_cache(maxsize=8)
def rules(model: ModelConfig, te_names: bool) -> tuple[Rule, ...]:
    """Every Megatron tensor of the model with its HF tensors, in the order of GPTModel.named_parameters()."""
    _check_supported(model)
    hidden, vocab = model.hidden_size, model.vocab_size
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, hidden),))]
    for layer in range(model.num_layers):
        megatron, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out += _attention_rules(model, megatron, hf, te_names)
        out += _mlp_rules(model, megatron, hf, te_names)
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((hidden,),)))
    if model.untie_embeddings_and_output_weights:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), ((vocab, hidden),)))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _rules_by_megatron_name(model: ModelConfig) -> dict[str, Rule]:
    return {rule.megatron: rule for te_names in (False, True) for rule in rules(model, te_names)}


def _check_supported(model: ModelConfig) -> None:
    for field, supported in (("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False)):
        if getattr(model, field) != supported:
            raise ValueError(f"model.{field} = {getattr(model, field)!r} has no Hugging Face mapping; "
                             f"supported: {supported!r} (Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE)")


def _attention_rules(model: ModelConfig, megatron: str, hf: str, te_names: bool) -> list[Rule]:
    hidden = model.hidden_size
    head_dim = model.kv_channels or hidden // model.num_attention_heads
    q_rows, kv_rows = model.num_attention_heads * head_dim, model.query_groups * head_dim
    attention, hf_attention = megatron + "self_attention.", hf + "self_attn."
    input_norm = attention + "linear_qkv.layer_norm_weight" if te_names else megatron + "input_layernorm.weight"
    out = [Rule(input_norm, (hf + "input_layernorm.weight",), ((hidden,),)),
           Rule(attention + "linear_proj.weight", (hf_attention + "o_proj.weight",), ((hidden, q_rows),))]
    for kind, row in [("weight", (hidden,)), *([("bias", ())] if model.add_qkv_bias else [])]:
        out.append(Rule(attention + f"linear_qkv.{kind}", tuple(hf_attention + f"{p}_proj.{kind}" for p in "qkv"),
                        ((q_rows, *row), (kv_rows, *row), (kv_rows, *row)), QKV))
    if model.qk_layernorm:
        out += [Rule(attention + f"{p}_layernorm.weight", (hf_attention + f"{p}_norm.weight",), ((head_dim,),))
                for p in "qk"]
    return out


def _mlp_rules(model: ModelConfig, megatron: str, hf: str, te_names: bool) -> list[Rule]:
    hidden, mlp = model.hidden_size, megatron + "mlp."
    post_attention_norm = (hf + "post_attention_layernorm.weight",)
    if model.num_experts is None:
        pre_mlp_norm = mlp + "linear_fc1.layer_norm_weight" if te_names else megatron + "pre_mlp_layernorm.weight"
        return [Rule(pre_mlp_norm, post_attention_norm, ((hidden,),)),
                *_swiglu(mlp + "linear_fc1.weight", mlp + "linear_fc2.weight", hf + "mlp.", model.ffn_hidden_size,
                         hidden)]
    out = [Rule(megatron + "pre_mlp_layernorm.weight", post_attention_norm, ((hidden,),)),
           Rule(mlp + "router.weight", (hf + "mlp.gate.weight",), ((model.num_experts, hidden),))]
    expert_size = model.moe_ffn_hidden_size or model.ffn_hidden_size
    for expert in range(model.num_experts):
        fc1, fc2 = ((f"experts.linear_fc1.weight{expert}", f"experts.linear_fc2.weight{expert}") if te_names else
                    (f"experts.local_experts.{expert}.linear_fc1.weight",
                     f"experts.local_experts.{expert}.linear_fc2.weight"))
        out += _swiglu(mlp + fc1, mlp + fc2, hf + f"mlp.experts.{expert}.", expert_size, hidden)
    if model.moe_shared_expert_intermediate_size:
        if model.moe_shared_expert_gate:
            out.append(Rule(mlp + "shared_experts.gate_weight", (hf + "mlp.shared_expert_gate.weight",),
                            ((1, hidden),)))
        out += _swiglu(mlp + "shared_experts.linear_fc1.weight", mlp + "shared_experts.linear_fc2.weight",
                       hf + "mlp.shared_expert.", model.moe_shared_expert_intermediate_size, hidden)
    return out


def _swiglu(fc1: str, fc2: str, hf: str, size: int, hidden: int) -> list[Rule]:
    return [Rule(fc1, (hf + "gate_proj.weight", hf + "up_proj.weight"), ((size, hidden), (size, hidden)), GATE_UP),
            Rule(fc2, (hf + "down_proj.weight",), ((hidden, size),))]


def _join(rule: Rule, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The Megatron tensor from its HF parts (see the module docstring for the layouts)."""
    if rule.join == QKV:  # [q; k; v] -> per group g: [q heads of g; k_g; v_g]
        groups, row = model.query_groups, parts[0].shape[1:]
        return torch.cat([part.reshape(groups, -1, *row) for part in parts], dim=1).reshape(-1, *row)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split(rule: Rule, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The inverse of _join."""
    sizes = [shape[0] for shape in rule.hf_shapes]
    if rule.join == QKV:
        groups, row = model.query_groups, tensor.shape[1:]
        per_group = tensor.reshape(groups, -1, *row).split([size // groups for size in sizes], dim=1)
        return [part.reshape(-1, *row) for part in per_group]
    return list(tensor.split(sizes))


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"HF tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {shape}")
    return tensor


def _check_names(present: set[str], expected: dict[str, tuple[int, ...]]) -> None:
    missing = [name for name in expected if name not in present]
    unexpected = sorted(present - expected.keys())
    if missing or unexpected:
        raise ValueError(f"the HF tensors do not match the model: {len(missing)} missing {_some(missing)}, "
                         f"{len(unexpected)} unexpected {_some(unexpected)}")


def _some(names: list[str], shown: int = 6) -> list[str]:
    return names[:shown] + ([f"... {len(names) - shown} more"] if len(names) > shown else [])


__all__ = ["hf_names", "hf_to_megatron", "megatron_to_hf", "model_config_from_hf", "rules"]

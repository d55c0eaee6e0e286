"""The learner's Megatron-Core GPTModel, dense or Mixture-of-Experts, from the run configuration.

    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.data.pack_sequences)  # one per virtual PP stage
    logits = chunks[0](tokens, position_ids, None)         # [b, s, vocab / tp] on the last stage

Call after megatron_rl.parallel.state.initialize_parallel. Weights and compute are fp32; RoPE
positions; no dropout (RL recomputes log-probs that must match the rollout's). On a GPU with
Transformer Engine the layers are TE's (including TE's CP attention); otherwise Megatron's local
layers, with ContextParallelAttention as core attention when cp > 1 or when the model takes packed
sequences (Megatron's local DotProductAttention takes neither), weights initialised on the
CPU (`use_cpu_initialization`: the full matrix is drawn, then sliced, so a TP=1 and a TP=2 model
built from the same seed hold the same weights) and MoE tokens routed by the alltoall dispatcher.
"""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.learner.attention import ContextParallelAttention
from megatron_rl.parallel.state import megatron_parallel_sizes
from megatron_rl.platform import gpu_available


def use_transformer_engine() -> bool:
    return HAVE_TE and gpu_available()


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """Megatron's TransformerConfig for this architecture and parallel layout."""
    if model.vocab_size % parallel.tp:
        raise ValueError(f"model.vocab_size = {model.vocab_size} must be divisible by parallel.tp = {parallel.tp} "
                         "(the embedding and output layer are split over TP ranks by vocabulary rows)")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        qk_layernorm=model.qk_layernorm,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=not gpu_available(),
        sequence_parallel=parallel.sequence_parallel,
        **megatron_parallel_sizes(parallel),
        **_moe_fields(model),
    )


def _moe_fields(model: ModelConfig) -> dict:
    if model.num_experts is None:
        return {}
    return {
        "num_moe_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        "moe_router_score_function": model.moe_router_score_function,
        "moe_router_pre_softmax": model.moe_router_pre_softmax,
        "moe_shared_expert_gate": model.moe_shared_expert_gate,
        "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
        "moe_router_load_balancing_type": "aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": use_transformer_engine(),
    }


def layer_spec(model: ModelConfig, parallel: ParallelConfig, packed_sequences: bool = False) -> ModuleSpec:
    """TE layers on a GPU with TE (they take packed sequences as they are); local layers otherwise,
    with ContextParallelAttention when cp > 1 or packed_sequences."""
    if use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=True, qk_layernorm=model.qk_layernorm)
    spec = get_gpt_layer_local_spec(
        num_experts=model.num_experts, qk_layernorm=model.qk_layernorm, normalization=model.normalization)
    if parallel.cp > 1 or packed_sequences:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return spec


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None,
                    config: TransformerConfig | None = None, packed_sequences: bool = False) -> GPTModel:
    """This rank's GPTModel for (virtual) pipeline stage vp_stage; packed_sequences: it will take
    PackedSeqParams (data.pack_sequences).

    pre_process / post_process (embedding / output layer) default to whether this is the first /
    last stage. Logits stay split over TP ranks by vocabulary (parallel_output=True). `config`
    (default: transformer_config(model, parallel)) lets model chunks share one TransformerConfig.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config or transformer_config(model, parallel),
        transformer_layer_spec=layer_spec(model, parallel, packed_sequences),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, packed_sequences: bool = False) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (a single one without vpp)."""
    config = transformer_config(model, parallel)
    stages = [None] if parallel.vpp is None else range(parallel.vpp)
    return [build_gpt_model(model, parallel, vp_stage=stage, config=config, packed_sequences=packed_sequences)
            for stage in stages]

"""Core attention for Megatron-Core's local layer spec that works under context parallelism.

Megatron's local DotProductAttention refuses cp > 1 and TE's CP attention needs CUDA; this module
is the all-gather flavour of CP attention (TE's cp_comm_type="all_gather") in plain PyTorch:

1. Layout: a sequence of length S is cut into 2*cp chunks of length c = S / (2*cp); CP rank r
   holds chunks (r, 2cp-1-r) (megatron_rl.parallel.context_parallel.zigzag_chunks), so its
   queries are q: [2c, b, np, hn] at global positions pos(r) = [r*c, (r+1)*c) ++ [(2cp-1-r)*c, (2cp-r)*c).
2. K and V ([2c, b, ng, hn]) are all-gathered over the CP group with Megatron's
   gather_from_sequence_parallel_region (backward: reduce-scatter of dK, dV) into
   [2c*cp, b, ng, hn], rank-major, whose global positions are pos(0) ++ ... ++ pos(cp-1).
3. out = softmax(q k^T * scale + M) v with M = 0 where pos_q >= pos_k, -inf elsewhere (causal on
   global positions), by torch's scaled_dot_product_attention; grouped-query attention
   (np query heads sharing ng key/value heads, np % ng == 0) is SDPA's enable_gqa.

Output: [2c, b, np*hn], like DotProductAttention. With cp == 1 it is plain causal attention.

Packed sequences (cp == 1 only; Megatron's PackedSeqParams, qkv_format "thd"): q, k, v are
[t, heads, hn] (the batch of one row squeezed out) and segment k = columns [cu[k], cu[k+1]) of
cu = cu_seqlens_q attends causally to itself only (block-diagonal causal); output [t, np*hn]. The
segments run one SDPA call each, which costs sum(length^2), where one call with the block-diagonal
mask costs t^2: measured by tools/bench_packing.py (forward + backward, 4 query / 2 key-value heads
of 64, long-tailed segments, 1 thread) 34 vs 135 ms at t = 1024 in 10 segments, 278 vs 2404 ms at
t = 4096 in 12.

Not supported (a clear error instead): packed sequences under context parallelism, attention
masks or biases, dropout, and the DotProductAttention options that change the softmax (query-key
layer scaling, windows, offsets).
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_rl.parallel.context_parallel import zigzag_chunks


def zigzag_positions(cp_rank: int, cp_size: int, local_length: int) -> torch.Tensor:
    """Global token positions of CP rank cp_rank's local_length tokens (all of them when cp_size == 1)."""
    if cp_size == 1:
        return torch.arange(local_length)
    chunk = local_length // 2
    return torch.cat([torch.arange(index * chunk, (index + 1) * chunk) for index in zigzag_chunks(cp_rank, cp_size)])


class ContextParallelAttention(MegatronModule):
    """Drop-in `core_attention` for get_gpt_layer_local_spec; see the module docstring."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        unsupported = {
            "attn_mask_type": attn_mask_type != AttnMaskType.causal,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "window_size": config.window_size is not None,
            "softmax_type": config.softmax_type != "vanilla",
            "attention_dropout": (config.attention_dropout if attention_dropout is None else attention_dropout) > 0,
        }
        if any(unsupported.values()):
            raise NotImplementedError(f"ContextParallelAttention supports plain causal softmax attention; "
                                      f"unsupported: {[name for name, bad in unsupported.items() if bad]}")
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None:
            raise NotImplementedError("ContextParallelAttention takes no attention masks or biases")
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        if packed_seq_params is not None:
            if cp_size > 1 or packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(f"ContextParallelAttention takes packed sequences in the thd format with "
                                          f"cp = 1 only, got qkv_format {packed_seq_params.qkv_format!r} and "
                                          f"cp = {cp_size} (set data.pack_sequences false or parallel.cp 1)")
            return self._packed(query, key, value, packed_seq_params.cu_seqlens_q)
        local_length, batch = query.shape[0], query.shape[1]
        if cp_size > 1:
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        query_positions = zigzag_positions(cp_rank, cp_size, local_length)
        key_positions = torch.cat([zigzag_positions(rank, cp_size, local_length) for rank in range(cp_size)])
        visible = (query_positions[:, None] >= key_positions[None, :]).to(query.device)
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),  # [b, heads, s, hn]
            attn_mask=visible, scale=self.softmax_scale, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(local_length, batch, -1)

    def _packed(self, query, key, value, cu_seqlens):
        """Block-diagonal causal attention of [t, heads, hn] q / k / v, segments cut at cu_seqlens."""
        bounds = cu_seqlens.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(
                *(x[start:end].transpose(0, 1) for x in (query, key, value)),  # [heads, length, hn]
                is_causal=True, scale=self.softmax_scale, enable_gqa=True).transpose(0, 1)
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)])
        return out.reshape(query.shape[0], -1)

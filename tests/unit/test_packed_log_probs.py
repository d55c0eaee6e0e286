"""A packed micro-batch gives the padded layout's log-probs, entropies and gradients (one gloo rank, fp32).

The same tiny GPTModels (dense with grouped-query attention, and MoE) are built twice from one
seed: with Megatron's local DotProductAttention for padded rows, and with ContextParallelAttention
taking PackedSeqParams (thd) for the packed row. On every column of every sequence the packed
log-probs (unpacked) and entropies equal the padded ones within 5e-5, and so do the parameter
gradients of the masked log-prob sum; the same packed row read as one sequence (no cu_seqlens)
does not (so the check can fail).
"""

import dataclasses

import pytest
import torch
from single_process import single_process_megatron

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state  # noqa: E402

from megatron_rl.learner.batching import RolloutSample, collate, collate_packed  # noqa: E402
from megatron_rl.learner.model import build_gpt_model  # noqa: E402
from megatron_rl.learner.step import packed_seq_params  # noqa: E402
from megatron_rl.learner.thd import PackedSequences  # noqa: E402
from megatron_rl.parallel.vocab_parallel import log_probs_and_entropy  # noqa: E402

SEED, TOL, TEMPERATURE = 4321, 5e-5, 0.7
DENSE = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=128, max_position_embeddings=64)
MOE = DENSE.model_copy(update={"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 64})
LENGTHS = [(3, 5), (7, 1), (2, 12), (5, 5), (1, 2)]  # (prompt, response) tokens


@pytest.fixture(scope="module")
def megatron_world():
    with single_process_megatron(SEED):
        yield


def samples() -> list[RolloutSample]:
    generator = torch.Generator().manual_seed(SEED)
    return [RolloutSample(torch.randint(1, 128, (p,), generator=generator).tolist(),
                          torch.randint(1, 128, (r,), generator=generator).tolist(), 1.0) for p, r in LENGTHS]


def forward(model, mb, params=None):
    """([b, S] log-probs, [b, S] entropies, gradients of the masked log-prob sum)."""
    model.zero_grad()
    logits = model(mb.tokens, mb.position_ids, None, packed_seq_params=params)
    b, s, vocab = logits.shape
    log_prob, entropy = log_probs_and_entropy(logits.reshape(b * s, vocab), mb.labels.reshape(-1),
                                              parallel_state.get_tensor_model_parallel_group(), TEMPERATURE)
    log_prob, entropy = log_prob.view(b, s), entropy.view(b, s)
    grads = torch.autograd.grad((log_prob * mb.loss_mask).sum(), list(model.parameters()))
    return log_prob.detach(), entropy.detach(), grads


@pytest.mark.parametrize("model_config", [DENSE, MOE], ids=["dense", "moe"])
def test_packed_log_probs_equal_the_padded_ones(megatron_world, model_config):
    padded_model = build_gpt_model(model_config, ParallelConfig())
    packed_model = build_gpt_model(model_config, ParallelConfig(), packed_sequences=True)
    packed_model.load_state_dict(padded_model.state_dict())
    batch = samples()
    padded = collate(batch, range(len(batch)), pad_multiple=4)
    packed = collate_packed(batch, range(len(batch)), pad_multiple=4)
    assert packed.packing.cu_seqlens.tolist() == [0, 8, 16, 30, 40, 43, 44]  # the last segment: padding

    want_lp, want_entropy, want_grads = forward(padded_model, padded)
    got_lp, got_entropy, got_grads = forward(packed_model, packed, packed_seq_params(packed))
    width = max(len(s) for s in batch)
    in_sequence = torch.arange(width)[None, :] < torch.tensor([len(s) for s in batch])[:, None]
    for want, got in ((want_lp, got_lp), (want_entropy, got_entropy)):
        unpacked = packed.per_sequence(got)
        assert unpacked.shape == (len(batch), width)
        assert (unpacked - want[:, :width])[in_sequence].abs().max() <= TOL
    for want, got in zip(want_grads, got_grads, strict=True):
        assert (want - got).abs().max() <= TOL * max(1.0, want.abs().max().item())
    assert max(g.abs().max().item() for g in want_grads) > 1e-3

    as_one_sequence = PackedSequences(torch.tensor([0, packed.packing.width], dtype=torch.int32), 1)
    unseparated = dataclasses.replace(packed, packing=as_one_sequence)
    leaked, _, _ = forward(packed_model, packed, packed_seq_params(unseparated))
    assert (packed.per_sequence(leaked) - want_lp[:, :width])[in_sequence].abs().max() > 1e-2

"""Vocab-parallel log-probs / entropy / KL on one rank (tp_group=None) against plain torch.

Reference: torch.log_softmax(logits / temperature) over the whole vocabulary, and autograd
through it. The 2-rank split is tested in tests/distributed/test_vocab_parallel.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rl.algorithms.kl import exact_kl_from_logits
from megatron_rl.parallel.vocab_parallel import (
    log_probs_and_entropy,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
)

TOKENS, VOCAB = 13, 37
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
TEMPERATURES = (1.0, 0.6, 1.7)
CHUNK_SIZES = (1, 7, TOKENS, TOKENS + 5, None)
BENCH = Path(__file__).parents[2] / "tools" / "bench_logprob.py"


def make_inputs(dtype=torch.float64, seed=0, shape=(TOKENS,)):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, VOCAB, generator=gen, dtype=torch.float64)).to(dtype)
    other = logits + torch.randn(*shape, VOCAB, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, VOCAB, shape, generator=gen)
    return logits, other, labels


def naive(logits, labels, temperature):
    """(log pi(label), entropy) by torch.log_softmax over the whole vocabulary."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    return log_p.gather(-1, labels[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


def naive_kl(logits_p, logits_q, temperature):
    log_p, log_q = (torch.log_softmax(x / temperature, dim=-1) for x in (logits_p, logits_q))
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_values_match_torch(dtype, temperature, chunk_size):
    logits, other, labels = make_inputs(dtype)
    log_probs, entropy = log_probs_and_entropy(logits, labels, temperature=temperature, chunk_size=chunk_size)
    ref_log_probs, ref_entropy = naive(logits, labels, temperature)
    assert log_probs.dtype == entropy.dtype == dtype
    assert max_diff(log_probs, ref_log_probs) <= TOL[dtype]
    assert max_diff(entropy, ref_entropy) <= TOL[dtype]
    assert torch.equal(vocab_parallel_log_probs(logits, labels, None, temperature, chunk_size), log_probs)
    assert torch.equal(vocab_parallel_entropy(logits, None, temperature, chunk_size), entropy)
    kl = vocab_parallel_kl(logits, other, temperature=temperature, chunk_size=chunk_size)
    assert max_diff(kl, naive_kl(logits, other, temperature)) <= TOL[dtype]
    assert max_diff(kl, exact_kl_from_logits(logits, other, temperature)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_gradients_match_autograd_of_naive(dtype, temperature, chunk_size):
    logits, other, labels = make_inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    g_lp, g_h, g_kl = torch.randn(3, TOKENS, generator=gen, dtype=torch.float64).to(dtype)

    def grads(log_probs_entropy, kl):
        x, p, q = (t.clone().requires_grad_() for t in (logits, logits, other))
        log_probs, entropy = log_probs_entropy(x)
        torch.autograd.backward([log_probs, entropy, kl(p, q)], [g_lp, g_h, g_kl])
        return x.grad, p.grad, q.grad

    ours = grads(lambda x: log_probs_and_entropy(x, labels, None, temperature, chunk_size),
                 lambda p, q: vocab_parallel_kl(p, q, None, temperature, chunk_size))
    reference = grads(lambda x: naive(x, labels, temperature), lambda p, q: naive_kl(p, q, temperature))
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == dtype
        assert max_diff(mine, theirs) <= TOL[dtype]


@pytest.mark.parametrize("temperature", (1.0, 0.6))
def test_gradcheck(temperature):
    logits, other, labels = make_inputs(shape=(5,))
    logits, other = logits.requires_grad_(), other.requires_grad_()
    kw = {"temperature": temperature, "chunk_size": 2}
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_log_probs(x, labels, **kw), (logits,))
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_entropy(x, **kw), (logits,))
    assert torch.autograd.gradcheck(lambda x: log_probs_and_entropy(x, labels, **kw), (logits,))
    assert torch.autograd.gradcheck(lambda p, q: vocab_parallel_kl(p, q, **kw), (logits, other))


def test_kl_gradient_is_q_minus_p_when_p_is_fixed():
    logits_p, logits_q, _ = make_inputs()
    logits_q.requires_grad_()
    vocab_parallel_kl(logits_p, logits_q, temperature=0.8).sum().backward()
    expected = (torch.softmax(logits_q.detach() / 0.8, -1) - torch.softmax(logits_p / 0.8, -1)) / 0.8
    assert max_diff(logits_q.grad, expected) <= 1e-12


def test_chunking_invariance():
    logits, other, labels = make_inputs()
    results = []
    for chunk_size in CHUNK_SIZES:
        x, q = logits.clone().requires_grad_(), other.clone().requires_grad_()
        log_probs, entropy = log_probs_and_entropy(x, labels, chunk_size=chunk_size)
        kl = vocab_parallel_kl(logits, q, chunk_size=chunk_size)
        (log_probs.sum() + entropy.sum() + kl.sum()).backward()
        results.append(torch.cat([log_probs, entropy, kl, x.grad.flatten(), q.grad.flatten()]).detach())
    for result in results[1:]:
        assert max_diff(result, results[0]) <= 1e-12


def test_leading_batch_dims():
    logits, other, labels = make_inputs(shape=(3, 4))
    log_probs, entropy = log_probs_and_entropy(logits, labels, chunk_size=5)
    assert log_probs.shape == entropy.shape == (3, 4)
    flat_log_probs, flat_entropy = log_probs_and_entropy(logits.reshape(12, VOCAB), labels.reshape(12))
    assert max_diff(log_probs.flatten(), flat_log_probs) <= 1e-12
    assert max_diff(entropy.flatten(), flat_entropy) <= 1e-12
    assert vocab_parallel_kl(logits, other).shape == (3, 4)
    single = log_probs_and_entropy(logits[0, 0], labels[0, 0])  # one token: [V] and a 0-dim label
    assert single[0].shape == () and abs(single[0].item() - log_probs[0, 0].item()) <= 1e-12


def test_bfloat16_logits_compute_in_float32_and_return_bfloat16_gradients():
    logits, other, labels = make_inputs(torch.bfloat16)
    x = logits.clone().requires_grad_()
    log_probs, entropy = log_probs_and_entropy(x, labels)
    (log_probs.sum() + entropy.sum()).backward()
    ref_log_probs, ref_entropy = naive(logits.float(), labels, 1.0)
    assert log_probs.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert max_diff(log_probs, ref_log_probs) <= 1e-5 and max_diff(entropy, ref_entropy) <= 1e-5


def test_backward_saves_the_input_not_a_float32_copy():
    """Only the logits themselves (same storage) and per-token vectors are saved for backward."""
    logits, other, labels = make_inputs(torch.bfloat16)
    x, q = logits.clone().requires_grad_(), other.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        log_probs_and_entropy(x, labels, chunk_size=4)
        vocab_parallel_kl(x, q, chunk_size=4)
    full = [t for t in saved if t.numel() >= TOKENS * VOCAB]
    assert {t.data_ptr() for t in full} == {x.data_ptr(), q.data_ptr()}
    assert all(t.numel() == TOKENS for t in saved if t.numel() < TOKENS * VOCAB)


def test_masked_vocabulary_entries():
    """-inf logits have probability 0: same values as without them, zero and finite gradients."""
    logits, other, labels = make_inputs()
    masked = torch.zeros(VOCAB, dtype=torch.bool)
    masked[::5] = True
    labels = torch.where(masked[labels], labels + 1, labels)
    x = logits.masked_fill(masked, float("-inf")).requires_grad_()
    log_probs, entropy = log_probs_and_entropy(x, labels, temperature=0.9)
    kl = vocab_parallel_kl(x, other.masked_fill(masked, float("-inf")), temperature=0.9)
    (log_probs.sum() + entropy.sum() + kl.sum()).backward()
    keep = ~masked
    ref_log_probs, ref_entropy = naive(logits[:, keep], keep.cumsum(0)[labels] - 1, 0.9)
    assert max_diff(log_probs, ref_log_probs) <= 1e-12 and max_diff(entropy, ref_entropy) <= 1e-12
    assert max_diff(kl, naive_kl(logits[:, keep], other[:, keep], 0.9)) <= 1e-12
    assert x.grad.isfinite().all() and (x.grad[:, masked] == 0).all()
    labels[0] = 0  # a masked label
    assert vocab_parallel_log_probs(x, labels)[0].item() == float("-inf")


def test_bad_arguments():
    logits, other, labels = make_inputs()
    for bad in (-1, VOCAB):
        with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\).*{bad}"):
            vocab_parallel_log_probs(logits, labels.index_fill(0, torch.tensor([3]), bad))
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_log_probs(logits, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_log_probs(logits, labels.double())
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_entropy(logits, chunk_size=0)
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_kl(logits, other[:-1])


def test_benchmark_quick_prints_memory_ratios():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for variant in ("chunked", "naive"):
        assert any(line.startswith(variant) and "x" in line for line in proc.stdout.splitlines()), proc.stdout
    assert "peak extra memory / logits shard" in proc.stdout

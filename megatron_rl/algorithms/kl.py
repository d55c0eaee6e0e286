"""KL divergence: Schulman's single-sample estimators k1 / k2 / k3 and the exact full-vocabulary KL.

Direction (ALGORITHMS.md 1.8): samples y ~ q, log_ratio = log p(y) - log q(y) = log r, and the
estimators target KL(q || p). TRM uses q = pi_roll, p = pi_theta, so log_ratio =
log pi_theta - log pi_roll and E_{pi_roll}[k3] = KL(pi_roll || pi_theta).

The exact KL here is single-device; the tensor-parallel (vocab-sharded) version lives in
`megatron_rl.parallel.vocab_parallel`.
"""

import torch


def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = -log r, elementwise (any shape). Unbiased for KL(q || p) under y ~ q; can be negative."""
    return -log_ratio


def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log r)^2, elementwise. Biased estimate of KL(q || p); >= 0, symmetric in r <-> 1/r."""
    return 0.5 * log_ratio.square()


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, elementwise. Unbiased for KL(q || p) under y ~ q; >= 0.

    Computed as expm1(log r) - log r, which keeps its precision for log r near 0.
    """
    return torch.expm1(log_ratio) - log_ratio


def exact_kl_from_logits(
    logits_q: torch.Tensor,
    logits_p: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact per-token KL(q || p) = sum_v q_v (log q_v - log p_v) over the whole vocabulary.

    logits_q, logits_p: [..., V], same shape; q = softmax(logits_q / temperature), likewise p.
    Returns [...] in float32, or in the inputs' dtype if wider (bf16 / fp16 are upcast).
    Terms with q_v = 0 (logit -inf) contribute 0. chunk_size bounds memory: at most chunk_size
    tokens (rows of the flattened [N, V]) are expanded to the compute dtype at a time (without
    autograd; with it, each chunk's saved tensors stay alive until backward).
    """
    if logits_q.shape != logits_p.shape:
        raise ValueError(f"logits_q and logits_p must have the same shape, got "
                         f"{tuple(logits_q.shape)} and {tuple(logits_p.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    dtype = torch.promote_types(torch.promote_types(logits_q.dtype, logits_p.dtype), torch.float32)
    lead, vocab = logits_q.shape[:-1], logits_q.shape[-1]
    flat_q, flat_p = logits_q.reshape(-1, vocab), logits_p.reshape(-1, vocab)
    step = chunk_size or max(flat_q.shape[0], 1)

    def chunk_kl(lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(lq.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(lp.to(dtype) / temperature, dim=-1)
        q = log_q.exp()  # where() keeps 0 * (-inf) out of both the value and the gradient
        return (q * torch.where(q > 0, log_q - log_p, 0.0)).sum(dim=-1)

    parts = [chunk_kl(flat_q[i:i + step], flat_p[i:i + step]) for i in range(0, flat_q.shape[0], step)]
    out = torch.cat(parts) if parts else flat_q.new_zeros(0, dtype=dtype)
    return out.reshape(lead)

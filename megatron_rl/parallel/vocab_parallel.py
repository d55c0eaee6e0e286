"""Log-probabilities, entropy and exact KL from tensor-parallel (vocabulary-sharded) logits.

Layout (Megatron's vocab-parallel output layer): logits [..., V_local] hold this TP rank's
vocabulary slice [vocab_start, vocab_start + V_local), vocab_start = tp_rank * V_local, of a
vocabulary of V = tp_size * V_local ids (Megatron pads V to a multiple of tp_size). Leading dims
("tokens", e.g. [T] or [B, T]) are flattened to N rows. tp_group=None, or a group of size 1,
means the logits are the whole vocabulary. Every TP rank gets the same full-vocabulary result.

With z = logits / temperature (the rollout engine's logprobs are taken after temperature, so
the learner divides by the same one), per token:
    m = max_v z_v                                   all-reduce MAX of the local max
    S = sum_v exp(z_v - m)                          local partial sums, all-reduce SUM
    lse = m + log S,  log p_v = z_v - lse
    log p(label) = (z_label - m) - log S            z_label: only the owning rank contributes
    H = -sum_v p_v log p_v = log S - W / S,         W = sum_v exp(z_v - m) (z_v - m)
    KL(p || q) = A / S_p - log S_p + log S_q,       A = sum_v exp(zp_v - mp) ((zp_v - mp) - (zq_v - mq))
Forward: one all-reduce MAX and one all-reduce SUM of a few floats per token.

Gradients on the local shard (no communication; the loss is the same on every TP rank):
    d log p(label) / d logits_v = (onehot(label)_v - p_v) / temperature
    d H / d logits_v            = -p_v (log p_v + H) / temperature
    d KL / d logits_q_v         = (q_v - p_v) / temperature
    d KL / d logits_p_v         = p_v (log p_v - log q_v - KL) / temperature

Memory: tokens are processed chunk_size rows at a time, in float32 (or the logits' dtype if
wider); the outputs have that dtype too. Backward recomputes the softmax chunk by chunk from the
saved inputs and the per-token lse, so no [N, V_local] float32 copy is materialised in forward
or saved for backward: the extra memory is O(chunk_size * V_local) plus the gradient itself
(one [..., V_local] tensor in the logits' dtype). chunk_size=None: `default_chunk_size`, which
on CPU keeps a chunk's temporaries in cache (measured ~2.7x faster than 256 MiB chunks at
V_local = 151936) and elsewhere bounds each to 256 MiB. A non-contiguous logits costs one
extra copy in forward and one in backward (the flattening reshape).

Non-finite logits: shifted logits z_v - m are floored at SHIFTED_LOGIT_FLOOR inside the sums
and the backward, so a -inf logit (a masked vocabulary entry) has probability 0 and contributes
exactly 0 to S, W, the entropy, the gradients and (as p_v) to the KL; a label whose logit is
-inf gets log-prob -inf. Where q_v = 0 but p_v > 0, KL is large and finite (~1e4 p_v), not
inf. NaN or +inf logits, or a row that is all -inf, give NaN (the loss layer checks for it).
"""

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = {"cpu": 2**19}  # elements per float32 temporary, by device type: 2 MiB on CPU (cache-sized)
DEFAULT_CHUNK_ELEMENTS = 2**26  # 256 MiB elsewhere (few, large kernels)
SHIFTED_LOGIT_FLOOR = -1e4  # exp(-1e4) == 0 even in float64, so finite inputs are unaffected


def _rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_(x: torch.Tensor, op, group) -> torch.Tensor:
    if _rank_and_size(group)[1] > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def default_chunk_size(vocab_local: int, device: torch.device) -> int:
    """Tokens per chunk when chunk_size=None: CHUNK_ELEMENTS[device type] elements per temporary."""
    return max(1, CHUNK_ELEMENTS.get(torch.device(device).type, DEFAULT_CHUNK_ELEMENTS) // vocab_local)


def _row_chunks(flat: torch.Tensor, chunk_size: int | None) -> list[slice]:
    step = chunk_size or default_chunk_size(flat.shape[1], flat.device)
    return [slice(start, start + step) for start in range(0, flat.shape[0], step)]


def _shifted(logits: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh [rows, V_local] tensor in shift's dtype: logits / temperature - shift[:, None], floored."""
    return torch.add(-shift[:, None], logits, alpha=1 / temperature).clamp_(min=SHIFTED_LOGIT_FLOOR)


def _global_max(flats: list[torch.Tensor], temperature: float, dtype: torch.dtype, group) -> torch.Tensor:
    """[len(flats), N]: max_v logits_v / temperature over the full vocabulary, per token."""
    local = torch.stack([flat.amax(dim=-1).to(dtype) for flat in flats]) / temperature
    return _all_reduce_(local, dist.ReduceOp.MAX, group)


def _local_labels(labels: torch.Tensor, vocab_local: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of the label in this shard, clamped into range; whether this rank owns it), each [N]."""
    local = labels.reshape(-1) - _rank_and_size(group)[0] * vocab_local
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), owned


def _check(logits: torch.Tensor, temperature: float, chunk_size: int | None) -> None:
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V_local] with V_local >= 1, got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")


def _check_labels(labels: torch.Tensor, logits: torch.Tensor, group) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    vocab = logits.shape[-1] * _rank_and_size(group)[1]
    bad = (labels < 0) | (labels >= vocab)
    if bool(bad.any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}) (V = tp_size * V_local); "
                         f"got {labels[bad][:5].tolist()} at {bad.nonzero()[:5].tolist()}")


class _LogProbsAndEntropy(torch.autograd.Function):
    """(log p(label) or None if labels is None, H or None if not with_entropy), each [...]."""

    @staticmethod
    def forward(ctx, logits, labels, with_entropy, group, temperature, chunk_size):
        ctx.set_materialize_grads(False)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.reshape(-1, logits.shape[-1])
        shift = _global_max([flat], temperature, dtype, group)[0]
        sums = flat.new_zeros(3, flat.shape[0], dtype=dtype)  # S, W, z_label - m
        for rows in _row_chunks(flat, chunk_size):
            z = _shifted(flat[rows], shift[rows], temperature)
            e = z.exp()
            sums[0, rows] = e.sum(dim=-1)
            if with_entropy:
                sums[1, rows] = e.mul_(z).sum(dim=-1)
        if labels is not None:
            column, owned = _local_labels(labels, flat.shape[1], group)
            target = flat.gather(1, column[:, None])[:, 0].to(dtype) / temperature - shift
            sums[2] = torch.where(owned, target, 0.0)
        _all_reduce_(sums, dist.ReduceOp.SUM, group)
        log_norm = sums[0].log()
        log_probs = (sums[2] - log_norm).reshape(labels.shape) if labels is not None else None
        entropy = (log_norm - sums[1] / sums[0]).reshape(logits.shape[:-1]) if with_entropy else None
        ctx.save_for_backward(logits, labels, shift + log_norm, entropy)
        ctx.group, ctx.temperature, ctx.chunk_size, ctx.dtype = group, temperature, chunk_size, dtype
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        """grad = p * (slope * log p + offset) + onehot(label) * g_lp / temperature, per chunk, where
        slope = -g_H / temperature and offset = -(g_lp + g_H * H) / temperature (per token)."""
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * 6
        flat = logits.reshape(-1, logits.shape[-1])

        def per_token(grad):
            return 0.0 if grad is None else grad.reshape(-1, 1).to(ctx.dtype) / ctx.temperature

        g_lp, g_h = per_token(grad_log_probs), per_token(grad_entropy)
        offset = -g_lp - (g_h * entropy.reshape(-1, 1) if grad_entropy is not None else 0.0)  # a tensor
        if grad_log_probs is not None:
            column, owned = _local_labels(labels, flat.shape[1], ctx.group)
            onehot_weight = torch.where(owned[:, None], g_lp, 0.0)
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format)
        for rows in _row_chunks(flat, ctx.chunk_size):
            log_p = _shifted(flat[rows], lse[rows], ctx.temperature)
            chunk_grad = log_p.exp()
            if grad_entropy is not None:
                chunk_grad.mul_(log_p.mul_(-g_h[rows]).add_(offset[rows]))
            else:
                chunk_grad.mul_(offset[rows])
            if grad_log_probs is not None:
                chunk_grad.scatter_add_(1, column[rows, None], onehot_weight[rows])
            grad[rows] = chunk_grad
        return grad.reshape(logits.shape), None, None, None, None, None


class _ExactKL(torch.autograd.Function):
    """KL(p || q) [...] from two sharded logit sets; gradients w.r.t. both."""

    @staticmethod
    def forward(ctx, logits_p, logits_q, group, temperature, chunk_size):
        dtype = torch.promote_types(torch.promote_types(logits_p.dtype, logits_q.dtype), torch.float32)
        flat_p, flat_q = (x.reshape(-1, x.shape[-1]) for x in (logits_p, logits_q))
        shift_p, shift_q = _global_max([flat_p, flat_q], temperature, dtype, group)
        sums = flat_p.new_zeros(3, flat_p.shape[0], dtype=dtype)  # S_p, S_q, A
        for rows in _row_chunks(flat_p, chunk_size):
            zp = _shifted(flat_p[rows], shift_p[rows], temperature)
            zq = _shifted(flat_q[rows], shift_q[rows], temperature)
            ep = zp.exp()
            sums[0, rows] = ep.sum(dim=-1)
            sums[2, rows] = ep.mul_(zp.sub_(zq)).sum(dim=-1)
            sums[1, rows] = zq.exp_().sum(dim=-1)
        _all_reduce_(sums, dist.ReduceOp.SUM, group)
        log_norm_p, log_norm_q = sums[0].log(), sums[1].log()
        kl = sums[2] / sums[0] - log_norm_p + log_norm_q
        ctx.save_for_backward(logits_p, logits_q, shift_p + log_norm_p, shift_q + log_norm_q, kl)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return kl.reshape(logits_p.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        logits_p, logits_q, lse_p, lse_q, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        flat_p, flat_q = (x.reshape(-1, x.shape[-1]) for x in (logits_p, logits_q))
        grad_p = torch.empty_like(flat_p, memory_format=torch.contiguous_format) if need_p else None
        grad_q = torch.empty_like(flat_q, memory_format=torch.contiguous_format) if need_q else None
        scale = grad_kl.reshape(-1, 1).to(kl.dtype) / ctx.temperature
        for rows in _row_chunks(flat_p, ctx.chunk_size):
            log_p = _shifted(flat_p[rows], lse_p[rows], ctx.temperature)
            log_q = _shifted(flat_q[rows], lse_q[rows], ctx.temperature)
            p = log_p.exp()
            if need_p:  # p (log p - log q - KL)
                grad_p[rows] = log_p.sub_(log_q).sub_(kl[rows, None]).mul_(p).mul_(scale[rows])
            if need_q:  # q - p
                grad_q[rows] = log_q.exp_().sub_(p).mul_(scale[rows])
        return (grad_p.reshape(logits_p.shape) if need_p else None,
                grad_q.reshape(logits_q.shape) if need_q else None, None, None, None)


def log_probs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(label), entropy of pi), each [...], sharing one max / normaliser pass.

    logits [..., V_local] (this rank's vocabulary slice), labels [...] global ids in [0, V).
    pi = softmax(logits / temperature) over the full vocabulary. Differentiable w.r.t. logits.
    """
    _check(logits, temperature, chunk_size)
    _check_labels(labels, logits, tp_group)
    return _LogProbsAndEntropy.apply(logits, labels, True, tp_group, temperature, chunk_size)


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log pi(label) [...] = logits[label] / temperature - logsumexp(logits / temperature), full vocabulary.

    logits [..., V_local] (this rank's vocabulary slice), labels [...] global ids in [0, V).
    Raises ValueError for labels outside [0, V). Differentiable w.r.t. logits.
    """
    _check(logits, temperature, chunk_size)
    _check_labels(labels, logits, tp_group)
    return _LogProbsAndEntropy.apply(logits, labels, False, tp_group, temperature, chunk_size)[0]


def vocab_parallel_entropy(
    logits: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy [...] of pi = softmax(logits / temperature) over the full vocabulary; differentiable."""
    _check(logits, temperature, chunk_size)
    return _LogProbsAndEntropy.apply(logits, None, True, tp_group, temperature, chunk_size)[1]


def vocab_parallel_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact KL(p || q) [...] = sum_v p_v (log p_v - log q_v) over the full vocabulary.

    p = softmax(logits_p / temperature), q = softmax(logits_q / temperature); both [..., V_local]
    sharded alike. Differentiable w.r.t. both (typical use: p fixed, e.g. pi_roll in TRM's exact
    mode, q = pi_theta). On one rank this equals algorithms.kl.exact_kl_from_logits(logits_p, logits_q).
    """
    _check(logits_p, temperature, chunk_size)
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p and logits_q must have the same shape, got "
                         f"{tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    return _ExactKL.apply(logits_p, logits_q, tp_group, temperature, chunk_size)

"""The RL step on Megatron-Core: log-prob recompute and one optimizer step of the policy loss.

    learner = PolicyLearner(cfg, model, optimizer, scheduler)
    old = learner.log_probs(micro_batches)                # pi_old, forward only
    result = learner.train_step(micro_batches, step_counts, old_log_probs=old)

`micro_batches` are this data-parallel rank's, whole sequences (`batching.micro_batches_for_rank`);
the learner cuts each into its context-parallel shard. Megatron's schedule runs them
(no pipelining, 1F1B, or interleaved 1F1B when vpp > 1); on the last pipeline stage the TP-sharded
logits become per-token log-probs of the labels at the rollout temperature
(`parallel.vocab_parallel`; in training also the policy's entropy, for policy/entropy), and the
loss is `compute_policy_loss` with the CP group and the step's token / sequence counts.

Packed micro-batches (data.pack_sequences, cp == 1): the model gets Megatron's PackedSeqParams
(qkv_format "thd", cu_seqlens of the row; the same call for TE's attention on a GPU and for
ContextParallelAttention on the CPU) and the log-probs come out [1, S] like the labels; the loss
and the counts see them unpacked to one row per sequence (`MicroBatch.per_sequence`), so every
per-sequence reduction, KPO's scan and every metric get exactly the padded layout's values.

Scaling. Each micro-batch's loss is its exact share of the step's loss (global denominators).
Megatron's schedule divides it by the number of micro-batches M and multiplies it by cp; DDP
averages gradients over the dp x cp ranks. The learner hands the schedule loss x dp x M, so the
gradient is the sum over micro-batches, DP ranks and CP shards: the gradient of the step's loss.

Guard. A NaN / inf log-prob on a response token, or a non-finite gradient anywhere, is reported
by every rank (all-reduce MAX); the optimizer step is then skipped and the weights stay
bitwise unchanged.
"""

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rl.algorithms.aggregation import GlobalCounts
from megatron_rl.algorithms.loss_inputs import NonFiniteInputError
from megatron_rl.algorithms.metrics import Accumulated, accumulate, combine, finalize
from megatron_rl.algorithms.policy_loss import compute_policy_loss
from megatron_rl.config import RunConfig
from megatron_rl.learner.batching import MicroBatch, pad_to_shape
from megatron_rl.parallel.context_parallel import sequence_ops, split_for_context_parallel
from megatron_rl.parallel.vocab_parallel import log_probs_and_entropy, vocab_parallel_log_probs
from megatron_rl.platform import local_device


@dataclass
class StepResult:
    """What one optimizer step did; `metrics` are the loss's (train/... names), the same on every rank."""

    loss: float
    grad_norm: float | None
    skipped: bool
    learning_rate: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    skip_reason: str | None = None


def shard_for_context_parallel(mb: MicroBatch) -> MicroBatch:
    """This CP rank's zig-zag shard of every [b, S] tensor of mb (response_start stays global)."""
    rank, size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    if mb.packing is not None and size > 1:
        raise ValueError("packed micro-batches (data.pack_sequences) cannot be split for parallel.cp > 1")

    def split(t):
        return None if t is None else split_for_context_parallel(t, rank, size, dim=1)

    return MicroBatch(tokens=split(mb.tokens), position_ids=split(mb.position_ids), labels=split(mb.labels),
                      loss_mask=split(mb.loss_mask), advantages=split(mb.advantages),
                      rollout_log_probs=split(mb.rollout_log_probs), response_start=mb.response_start,
                      sample_index=mb.sample_index, packing=mb.packing)


def packed_seq_params(mb: MicroBatch) -> PackedSeqParams | None:
    """Megatron's THD description of a packed micro-batch (None for padded rows)."""
    if mb.packing is None:
        return None
    cu_seqlens, longest = mb.packing.cu_seqlens, mb.packing.max_segment_length
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class PolicyLearner:
    """Runs the RL loss through Megatron's schedule for a model wrapped by `optimizer.wrap_data_parallel`."""

    def __init__(self, cfg: RunConfig, model, optimizer, scheduler):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.algorithm = cfg.algorithm
        self.temperature = cfg.rollout.sampling.temperature
        self.schedule = get_forward_backward_func()

    def _token_log_probs(self, logits: torch.Tensor, mb: MicroBatch,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([b, s] log pi(label), [b, s] entropy of pi if with_entropy else None) at the rollout
        temperature from logits [b, s, V/tp]."""
        b, s, vocab = logits.shape
        args = (logits.reshape(b * s, vocab), mb.labels.reshape(-1), parallel_state.get_tensor_model_parallel_group(),
                self.temperature)
        if not with_entropy:
            return vocab_parallel_log_probs(*args).view(b, s), None
        log_prob, entropy = log_probs_and_entropy(*args)
        return log_prob.view(b, s), entropy.view(b, s)

    def _run(self, micro_batches: list[MicroBatch], loss_fn, forward_only: bool) -> list[dict]:
        """The schedule over micro_batches; loss_fn(index, local_mb, logits) -> (loss, report).
        Returns the reports of the last pipeline stage, in micro-batch order (empty elsewhere).

        With pipeline parallelism every micro-batch is padded to one shape (stages exchange
        activations of a fixed shape; Megatron's variable-shape exchange deadlocks the
        interleaved schedule)."""
        if self.cfg.parallel.pp > 1:
            rows = max(mb.tokens.shape[0] for mb in micro_batches)
            width = max(mb.tokens.shape[1] for mb in micro_batches)
            micro_batches = [pad_to_shape(mb, rows, width) for mb in micro_batches]
        local = [shard_for_context_parallel(mb).to(local_device()) for mb in micro_batches]

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            logits = model(mb.tokens, mb.position_ids, None, packed_seq_params=packed_seq_params(mb))
            return logits, functools.partial(loss_fn, index, mb)

        reports = self.schedule(
            forward_step_func=forward_step, data_iterator=[iter(enumerate(local)) for _ in self.model],
            model=self.model, num_microbatches=len(local), seq_length=local[0].tokens.shape[1],
            micro_batch_size=local[0].tokens.shape[0], forward_only=forward_only)
        return sorted(reports, key=lambda report: report["index"])

    @torch.no_grad()
    def log_probs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """Per micro-batch [b, S/cp] log-probs of the labels under the current weights, in the
        micro-batch's layout (packed: [1, S]; the last pipeline stage's; None on other stages). Use
        them as old_log_probs of later steps."""
        def collect(index, mb, logits):
            return logits.new_zeros(()), {"index": index, "log_prob": self._token_log_probs(logits, mb)[0]}

        reports = self._run(micro_batches, collect, forward_only=True)
        return [report["log_prob"] for report in reports] if reports else None

    def train_step(self, micro_batches: list[MicroBatch], step_counts: GlobalCounts,
                   old_log_probs: list[torch.Tensor] | None = None) -> StepResult:
        """One optimizer step on micro_batches. step_counts: the step's response tokens and
        sequences over every micro-batch of every DP rank. old_log_probs: pi_old per micro-batch
        from `log_probs` (None: on-policy, pi_old = sg(pi_theta))."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = parallel_state.get_data_parallel_world_size() * len(micro_batches)
        problems: list[str] = []

        def loss_fn(index, mb, logits):
            log_prob, entropy = self._token_log_probs(logits, mb, with_entropy=True)
            old = old_log_probs[index] if old_log_probs is not None else log_prob.detach()
            log_prob, old, entropy = mb.per_sequence(log_prob), mb.per_sequence(old), mb.per_sequence(entropy)
            try:
                loss, metrics = compute_policy_loss(
                    self.algorithm.loss, log_prob, old, mb.per_sequence(mb.advantages), mb.per_sequence(mb.loss_mask),
                    rollout_log_prob=mb.per_sequence(mb.rollout_log_probs), config=self.algorithm,
                    cp_group=sequence_ops(parallel_state.get_context_parallel_group(), mb.response_start),
                    step_counts=step_counts, entropy=entropy)
            except NonFiniteInputError as error:
                problems.append(f"micro-batch {index}: {error}")
                return logits.sum() * 0.0, {"index": index, "loss": 0.0, "metrics": {}}
            report = {"index": index, "loss": loss.item(), "metrics": accumulate(metrics, *_counts(mb))}
            return loss * scale, report

        reports = self._run(micro_batches, loss_fn, forward_only=False)
        if not problems and not _grads_finite(self.model):
            problems.append("non-finite gradient")
        skipped = _any_rank(bool(problems))
        if skipped:
            for chunk in self.model:
                chunk.zero_grad_buffer()
            grad_norm = None
        else:
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        loss, metrics = _step_loss_and_metrics(reports)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped,
                          learning_rate=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start,
                          metrics=metrics, skip_reason="; ".join(problems) or ("on another rank" if skipped else None))


def _counts(mb: MicroBatch) -> tuple[float, float]:
    """Response tokens and non-empty sequences of a micro-batch's CP shard (global over CP)."""
    per_row = mb.per_sequence(mb.loss_mask).sum(-1)
    dist.all_reduce(per_row, group=parallel_state.get_context_parallel_group())
    return float(per_row.sum()), float((per_row > 0).sum())


def _grads_finite(model) -> bool:
    """Whether every gradient of this rank is finite. A NaN or inf anywhere makes its buffer's
    sum non-finite, so one sum per DDP gradient buffer and a single host read decide the usual
    case; only a non-finite sum (which finite values may also give, by overflow) is checked
    element by element."""
    buffers = [buffer.grad_data for chunk in model for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    if not buffers or bool(torch.isfinite(torch.stack([grads.sum() for grads in buffers])).all()):
        return True
    return all(bool(torch.isfinite(grads).all()) for grads in buffers)


def _any_rank(flag: bool) -> bool:
    """True on every rank when flag is True on any rank."""
    value = torch.tensor([float(flag)], device=local_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _step_loss_and_metrics(reports: list[dict]) -> tuple[float, dict[str, float]]:
    """The step's loss (sum of the micro-batch shares over DP) and its metrics, combined over
    micro-batches and DP ranks on the last pipeline stage, then sent to every stage."""
    payload = None
    if reports:  # last pipeline stage
        local_loss = sum(report["loss"] for report in reports)
        local: Accumulated = combine([report["metrics"] for report in reports])
        gathered = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(gathered, (local_loss, local), group=parallel_state.get_data_parallel_group())
        payload = (sum(loss for loss, _ in gathered), finalize(combine([acc for _, acc in gathered])))
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [payload]
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(holder, src=last, group=pipeline)
        payload = holder[0]
    loss, metrics = payload
    return loss, {f"train/{name}": value for name, value in metrics.items()}

"""Benchmark of the RL step against a plain cross-entropy step: same model, batch and optimizer, one run.

    python tools/bench_step.py                          # 4 layers, hidden 256, vocab 4096; kpo ppo vespo trm
    python tools/bench_step.py --losses kpo --repeats 30
    python tools/bench_step.py --quick                  # a tiny smoke run (ratios not meaningful)
    python tools/bench_step.py --profile kpo            # also: where the RL step's extra time goes

One process (world size 1, gloo, initialize_parallel in-process), one tiny Megatron-Core GPTModel
wrapped by Megatron's DDP, one Adam optimizer (`learner.optimizer.build_optimizer`, constant LR),
one batch of synthetic rollout samples cut into micro-batches by `plan_micro_batches` / `collate`.
Every step is timed from zeroing the gradients to the end of the optimizer step:

- rl/<loss>: `PolicyLearner.train_step` with algorithm.loss = <loss> (config defaults otherwise)
  and old log-probs recomputed once before timing, so the steps are off-policy as in training;
  the samples carry rollout log-probs (the old ones + noise), so the mismatch metrics run too.
- ce/logprob: the SAME model through Megatron's `get_forward_backward_func` on the same
  micro-batches, loss = token-mean cross-entropy of the same labels on the same loss mask
  (-vocab_parallel_log_probs at temperature 1, summed over the mask and divided by the step's
  response tokens, scaled like the learner's loss so the gradient is the step's), then the same
  optimizer.step() and scheduler step.
- ce/mcore: the same with Megatron's `tensor_parallel.vocab_parallel_cross_entropy`.

Variants run alternately: after --warmup steps of each, --repeats rounds; in every round, for
each RL loss in turn, rl/<loss>, ce/logprob and ce/mcore run back to back (their order rotated
every round), so each CE variant has as many steps as all RL losses together. Printed: per
variant the median step time and its breakdown (medians of fwd+bwd = the schedule call:
forward, loss, backward, finalize_model_grads; optim = optimizer.step(): grad norm, clip, Adam;
rest = everything else: zeroing grads, the learner's finite-gradient check and skip all-reduce,
the metrics' all_gather_object, the scheduler step), then per loss the ratio RL / CE of the
median step times against each CE variant (goal <= 1.10). Other processes on the machine make
step times jump; two estimates less sensitive to that are printed in brackets: the median of
the per-round ratios (an RL step and its CE steps run seconds apart) and the ratio of the
minimum times (RL steps over the CE steps of the same rounds). A note is printed when the
load average says that other processes competed.

--profile LOSS then runs rl/LOSS against ce/logprob again (--repeats rounds, alternating) with
the pieces of the step wrapped by timers in this process (Megatron's forward_step /
forward_step_calc_loss / backward_step / finalize_model_grads, the learner's module-level
helpers, the optimizer, torch.distributed; no file is changed): ms per step per piece, RL, CE
and RL - CE, median and minimum. Then, from one step of each, the torch.distributed calls and
the host reads of tensor values by call site (.item(), float(), bool(), .tolist(), ...: cheap on
the CPU, one device synchronisation each on a GPU); and from a cProfile of --repeats steps of
each, the Python functions only the RL step calls, by cumulative time.
"""

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_rl.config import config_from_dict
from megatron_rl.parallel.state import destroy_parallel, initialize_parallel
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func, schedules  # noqa: E402
from megatron.core.utils import get_model_config  # noqa: E402

from megatron_rl.algorithms.aggregation import GlobalCounts  # noqa: E402
from megatron_rl.learner import step as step_module  # noqa: E402
from megatron_rl.learner.batching import MicroBatch, RolloutSample, collate, plan_micro_batches  # noqa: E402
from megatron_rl.learner.model import build_model_chunks  # noqa: E402
from megatron_rl.learner.optimizer import build_optimizer, wrap_data_parallel  # noqa: E402
from megatron_rl.learner.step import PolicyLearner  # noqa: E402
from megatron_rl.parallel.vocab_parallel import vocab_parallel_log_probs  # noqa: E402

SEED = 1234
RL_LOSSES = ("kpo", "ppo", "vespo", "trm")
CE_LOSSES = ("logprob", "mcore")
GOAL = 1.10
# clock name -> label, in print order; indentation = nesting ("model forward" and "unattributed" are derived)
PIECES = (
    ("total", "whole step"),
    ("zero", "  zero grads (DDP buffers + optimizer)"),
    ("shard", "  shard_for_context_parallel"),
    ("fwd+bwd", "  schedule: forward, loss, backward, finalize"),
    ("forward", "    forward_step"),
    ("model", "      model forward"),
    ("loss", "      loss function (forward)"),
    ("logprob", "        log-probs of the labels (or CE)"),
    ("policy", "        compute_policy_loss"),
    ("accumulate", "        metrics.accumulate"),
    ("counts", "        _counts"),
    ("backward", "    backward_step (autograd)"),
    ("finalize", "    finalize_model_grads"),
    ("finite", "  _grads_finite"),
    ("any_rank", "  _any_rank"),
    ("optim", "  optimizer.step"),
    ("scheduler", "  scheduler.step"),
    ("metrics", "  _step_loss_and_metrics"),
    ("unattributed", "  unattributed (Python glue)"),
    ("collectives", "torch.distributed calls (inside the above)"),
)
TOP_LEVEL = ("zero", "shard", "fwd+bwd", "finite", "any_rank", "optim", "scheduler", "metrics")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "all_gather_into_tensor", "reduce_scatter_tensor", "barrier")
# Tensor methods that read a value on the host: free on the CPU, one device synchronisation each on a GPU
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero")


def make_samples(args) -> list[RolloutSample]:
    gen = torch.Generator().manual_seed(SEED)

    def length(longest: int) -> int:
        return int(torch.randint(max(1, longest // 2), longest + 1, (1,), generator=gen))

    samples = []
    for index in range(args.samples):
        prompt = torch.randint(1, args.vocab, (length(args.prompt_length),), generator=gen)
        response = torch.randint(1, args.vocab, (length(args.response_length),), generator=gen)
        samples.append(RolloutSample(prompt.tolist(), response.tolist(), advantage=(-1.0) ** index * (0.5 + index / 8)))
    return samples


def run_config(args, loss: str):
    width = args.prompt_length + args.response_length
    return config_from_dict({
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": args.ffn or 4 * args.hidden,
                  "num_attention_heads": args.heads, "vocab_size": args.vocab, "max_position_embeddings": width},
        "parallel": {"world_size": 1},
        "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "lr_warmup_steps": 0, "lr_decay_style": "constant",
                      "clip_grad": 1.0, "use_distributed_optimizer": False, "weight_decay": 0.0},
        "algorithm": {"loss": loss},
        "data": {"rollout_batch_size": args.samples, "num_mini_batches": 1,
                 "max_prompt_length": args.prompt_length, "max_response_length": args.response_length},
        "rollout": {"n_samples_per_prompt": 1},
    })


class Clock:
    """Seconds spent in wrapped callables, per name, since the last `reset` (and calls, per name)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


class HostReads(TorchFunctionMode):
    """Counts the tensor methods of HOST_READS called from Python (and boolean-mask indexing), per
    calling site (the first frame outside torch: file and function)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[tuple[str, str], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            name = "x[bool mask]"
        if name in HOST_READS or name == "x[bool mask]":
            frame = sys._getframe(1)
            while frame.f_back is not None and (f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
                                                or frame.f_code.co_filename == __file__):
                frame = frame.f_back
            site = f"{'/'.join(frame.f_code.co_filename.split(os.sep)[-2:])}:{frame.f_code.co_name}"
            self.counts[site, name] = self.counts.get((site, name), 0) + 1
        return func(*args, **(kwargs or {}))


def cross_entropy(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s] -log p(label) at temperature 1 from logits [b, s, V/tp]."""
    group = parallel_state.get_tensor_model_parallel_group()
    if kind == "mcore":
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels, tp_group=group)
    b, s, vocab = logits.shape
    return -vocab_parallel_log_probs(logits.reshape(b * s, vocab), labels.reshape(-1), group, 1.0).view(b, s)


def ce_step(loss_of, model, optimizer, scheduler, schedule, micro_batches: list[MicroBatch], tokens: float):
    """One plain cross-entropy optimizer step, the learner's way minus the RL parts.
    loss_of(logits, labels) -> [b, s] per-token cross-entropy."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    scale = parallel_state.get_data_parallel_world_size() * len(micro_batches)

    def loss(mb, logits):
        value = (loss_of(logits, mb.labels) * mb.loss_mask).sum() / tokens
        return value * scale, {"loss": value.detach()}

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        return chunk(mb.tokens, mb.position_ids, None), functools.partial(loss, mb)

    schedule(forward_step_func=forward_step, data_iterator=[iter(micro_batches) for _ in model], model=model,
             num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1],
             micro_batch_size=micro_batches[0].tokens.shape[0], forward_only=False)
    optimizer.step()
    scheduler.step(increment=1)


class Bench:
    """The model, optimizer, learners and batch shared by every variant, and the variants' steps."""

    def __init__(self, args):
        self.args, self.clock = args, Clock()
        configs = {loss: run_config(args, loss) for loss in args.losses}
        first = configs[args.losses[0]]
        initialize_parallel(first.parallel, seed=SEED)
        self.model = wrap_data_parallel(build_model_chunks(first.model, first.parallel), first.optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, first.optimizer, total_steps=10**9)
        self.learners = {loss: PolicyLearner(cfg, self.model, self.optimizer, self.scheduler)
                         for loss, cfg in configs.items()}

        samples = make_samples(args)
        plan = plan_micro_batches([len(s) for s in samples], 1, args.max_tokens)[0]
        self.micro_batches = [collate(samples, indices) for indices in plan]
        self.old = self.learners[args.losses[0]].log_probs(self.micro_batches)
        gen = torch.Generator().manual_seed(SEED + 1)
        for mb, lp in zip(self.micro_batches, self.old, strict=True):  # the sampler's log-probs: pi_old + noise
            mb.rollout_log_probs = (lp + 0.02 * torch.randn(lp.shape, generator=gen)) * mb.loss_mask
        self.counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
        self.skipped: list[str] = []

        self.optimizer.step = self.clock.wrap("optim", self.optimizer.step)
        self.schedule = self.clock.wrap("fwd+bwd", get_forward_backward_func())
        for learner in self.learners.values():
            learner.schedule = self.clock.wrap("fwd+bwd", learner.schedule)
        self.loss_of = {kind: functools.partial(cross_entropy, kind) for kind in CE_LOSSES}
        self.variants = [f"rl/{loss}" for loss in args.losses] + [f"ce/{kind}" for kind in CE_LOSSES]

    def run(self, name: str) -> None:
        kind, loss = name.split("/")
        if kind == "rl":
            result = self.learners[loss].train_step(self.micro_batches, self.counts, old_log_probs=self.old)
            if result.skipped:
                self.skipped.append(f"{loss}: {result.skip_reason}")
        else:
            ce_step(self.loss_of[loss], self.model, self.optimizer, self.scheduler, self.schedule,
                    self.micro_batches, self.counts.tokens)

    def alternate(self, groups: list[list[str]], rounds: int) -> list[dict[str, dict[str, list[float]]]]:
        """rounds x (each group, each running its variants back to back, in an order rotated every
        round). Per group, per variant, per clock piece: the seconds of each step ("total": the
        whole step). Variants in one group run seconds apart, so their per-round ratios see the
        same load from other processes."""
        out = [{name: {} for name in group} for group in groups]
        for round_index in range(rounds):
            for group, times in zip(groups, out, strict=True):
                shift = round_index % len(group)
                for name in group[shift:] + group[:shift]:
                    self.clock.reset()
                    start = time.perf_counter()
                    self.run(name)
                    for piece, value in {"total": time.perf_counter() - start, **self.clock.seconds}.items():
                        times[name].setdefault(piece, []).append(value)
        return out

    def instrument(self) -> None:
        """Time the pieces of PIECES from now on (wrappers in this process; no file is changed)."""
        wrap = self.clock.wrap
        schedules.forward_step = wrap("forward", schedules.forward_step)
        schedules.forward_step_calc_loss = wrap("loss", schedules.forward_step_calc_loss)
        schedules.backward_step = wrap("backward", schedules.backward_step)
        config = get_model_config(self.model[0])
        config.finalize_model_grads_func = wrap("finalize", config.finalize_model_grads_func)
        for name, piece in (("shard_for_context_parallel", "shard"), ("compute_policy_loss", "policy"),
                            ("accumulate", "accumulate"), ("_counts", "counts"), ("_grads_finite", "finite"),
                            ("_any_rank", "any_rank"), ("_step_loss_and_metrics", "metrics")):
            setattr(step_module, name, wrap(piece, getattr(step_module, name)))
        for learner in self.learners.values():
            learner._token_log_probs = wrap("logprob", learner._token_log_probs)
        self.loss_of = {kind: wrap("logprob", fn) for kind, fn in self.loss_of.items()}
        for chunk in self.model:
            chunk.zero_grad_buffer = wrap("zero", chunk.zero_grad_buffer)
        self.optimizer.zero_grad = wrap("zero", self.optimizer.zero_grad)
        self.scheduler.step = wrap("scheduler", self.scheduler.step)
        for name in COLLECTIVES:
            setattr(dist, name, wrap("collectives", getattr(dist, name)))
            setattr(dist, name, wrap(f"dist.{name}", getattr(dist, name)))


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=None, help="ffn hidden size (default 4 x hidden; SwiGLU)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=8, help="rollout samples in the step")
    parser.add_argument("--prompt-length", type=int, default=48, help="longest prompt (lengths drawn in [L/2, L])")
    parser.add_argument("--response-length", type=int, default=96, help="longest response (drawn in [L/2, L])")
    parser.add_argument("--max-tokens", type=int, default=512, help="token budget of a micro-batch (rows x S)")
    parser.add_argument("--losses", default=",".join(RL_LOSSES), help=f"comma-separated RL losses {RL_LOSSES}")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant")
    parser.add_argument("--repeats", type=int, default=20, help="rounds of alternating steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", metavar="LOSS", help="then break rl/LOSS and ce/logprob down (see above)")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 1 warm-up, 3 rounds, kpo only")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.ffn = 2, 64, 4, 512, None
        args.samples, args.prompt_length, args.response_length, args.max_tokens = 4, 16, 32, 128
        args.warmup, args.repeats, args.losses = 1, 3, "kpo"
    args.losses = [loss.strip() for loss in args.losses.split(",") if loss.strip()]
    if args.profile and args.profile not in args.losses:
        args.losses.append(args.profile)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    bench = Bench(args)
    for name in bench.variants:
        for _ in range(args.warmup):
            bench.run(name)
    groups = bench.alternate([[f"rl/{loss}", *(f"ce/{kind}" for kind in CE_LOSSES)] for loss in args.losses],
                             args.repeats)
    times = {}  # every step of each variant (the CE ones run in every group)
    for group in groups:
        for name, parts in group.items():
            for piece, values in parts.items():
                times.setdefault(name, {}).setdefault(piece, []).extend(values)

    params = sum(p.numel() for chunk in bench.model for p in chunk.parameters())
    shapes = ", ".join(f"{tuple(mb.tokens.shape)}" for mb in bench.micro_batches)
    print(f"RL step vs cross-entropy step: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"vocab {args.vocab}, {params / 1e6:.2f}M params, fp32, world size 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"batch: {args.samples} samples, {int(bench.counts.tokens)} response tokens, "
          f"{len(bench.micro_batches)} micro-batches [rows, S]: {shapes}; "
          f"{args.warmup} warm-up steps per variant, then {args.repeats} rounds of rl/<loss>, ce/logprob, ce/mcore "
          "back to back for each loss (order rotated every round)")
    for parts in times.values():
        parts["rest"] = [t - f - o for t, f, o in zip(parts["total"], parts["fwd+bwd"], parts["optim"], strict=True)]
    print(f"{'variant':<14}{'steps':>6}{'median ms':>11}{'fwd+bwd':>10}{'optim':>9}{'rest':>9}{'min ms':>9}"
          f"{'max ms':>9}")
    for name, parts in times.items():
        print(f"{name:<14}{len(parts['total']):>6}{median_ms(parts['total']):>11.1f}{median_ms(parts['fwd+bwd']):>10.1f}"
              f"{median_ms(parts['optim']):>9.1f}{median_ms(parts['rest']):>9.1f}"
              f"{min(parts['total']) * 1e3:>9.1f}{max(parts['total']) * 1e3:>9.1f}")
    print(f"ratio RL / CE = ratio of the median step times, goal <= {GOAL:.2f}; in brackets, less sensitive to other "
          "load on the machine: the median of the per-round ratios (steps seconds apart) and the ratio of the minima "
          "(the CE steps of the loss's own rounds)")
    for loss, group in zip(args.losses, groups, strict=True):
        shown, worst = [], 0.0
        for kind in CE_LOSSES:
            ratio = median_ms(times[f"rl/{loss}"]["total"]) / median_ms(times[f"ce/{kind}"]["total"])
            a, b = group[f"rl/{loss}"]["total"], group[f"ce/{kind}"]["total"]  # as many steps each
            paired = statistics.median(x / y for x, y in zip(a, b, strict=True))
            shown.append(f"/ ce/{kind} {ratio:5.3f} (paired {paired:5.3f}, min {min(a) / min(b):5.3f})")
            worst = max(worst, ratio)
        print(f"  rl/{loss:<8}{'   '.join(shown)}   {'ok' if worst <= GOAL else 'ABOVE GOAL'}")
    load = os.getloadavg()[0]
    if load > torch.get_num_threads() + 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores ({torch.get_num_threads()} threads here): "
              "other processes compete for the CPU, wall times are noisy")
    if bench.skipped:
        print(f"warning: {len(bench.skipped)} RL steps were skipped, e.g. {bench.skipped[0]}")
    if args.profile:
        profile(bench, args.profile, args.repeats)
    destroy_parallel()


def profile(bench: Bench, loss: str, rounds: int) -> None:
    """Per-piece medians of rl/loss vs ce/logprob, then cProfile's extra own time and the host reads."""
    rl, ce = f"rl/{loss}", "ce/logprob"
    bench.instrument()
    times = bench.alternate([[rl, ce]], rounds)[0]
    for parts in times.values():
        steps = len(parts["total"])
        for piece in ("forward", "loss", *TOP_LEVEL):
            parts.setdefault(piece, [0.0] * steps)
        parts["model"] = [f - lo for f, lo in zip(parts["forward"], parts["loss"], strict=True)]
        parts["unattributed"] = [parts["total"][i] - sum(parts[p][i] for p in TOP_LEVEL) for i in range(steps)]
    print(f"\nbreakdown, ms per step over {rounds} alternating rounds (timers around each piece); the min is the "
          "least disturbed by other load:")
    print(f"{'':<48}{'median ' + rl:>18}{ce:>11}{'RL - CE':>9}{'min ' + rl:>15}{ce:>11}{'RL - CE':>9}")
    for piece, label in PIECES:
        if piece in times[rl] or piece in times[ce]:
            values = [times[name].get(piece, [0.0]) for name in (rl, ce)]
            a, b = (median_ms(v) for v in values)
            c, d = (min(v) * 1e3 for v in values)
            print(f"{label:<48}{a:>18.2f}{b:>11.2f}{a - b:>9.2f}{c:>15.2f}{d:>11.2f}{c - d:>9.2f}")
    for name in (rl, ce):
        bench.clock.reset()
        bench.run(name)  # one step, for the call counts of the collectives
        calls = ", ".join(f"{key[5:]} x{n}" for key, n in bench.clock.calls.items() if key.startswith("dist."))
        print(f"torch.distributed calls per step, {name}: {calls or 'none'}")

    stats, reads = {}, {}
    for name in (rl, ce):
        counter = HostReads()
        with counter:
            bench.run(name)
        reads[name] = counter.counts
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(rounds):
            bench.run(name)
        profiler.disable()
        stats[name] = {key: (calls / rounds, own / rounds, cum / rounds)
                       for key, (_, calls, own, cum, _) in pstats.Stats(profiler).stats.items()}
    for name in (rl, ce):
        print(f"host reads of tensor values in one step (a GPU sync each), {name}: {sum(reads[name].values())}")
        for (site, method), n in sorted(reads[name].items(), key=lambda item: -item[1]):
            print(f"  {n:4d}  {method:<14}{site}")
    dispatch = {name: sum(calls for (path, _, fn), (calls, _, _) in stats[name].items()
                          if fn == "__torch_function__") for name in (rl, ce)}
    if any(dispatch.values()):
        print(f"torch calls per step through the CPU platform's TorchFunctionMode: {rl} {dispatch[rl]:.0f}, "
              f"{ce} {dispatch[ce]:.0f}")
    only = {key: value for key, value in stats[rl].items() if key[0] != "~" and key not in stats[ce]}
    print(f"\ncProfile over {rounds} steps each: the Python functions the {ce} step never calls, by cumulative "
          "time in the RL step (ms per step; nested functions count in their callers too; profiler overhead "
          "included; their autograd backward is not included):")
    print(f"  {'cum ms':>8}{'own ms':>8}{'calls':>7}  function")
    for (path, line, function), (calls, own, cum) in sorted(only.items(), key=lambda item: -item[1][2])[:20]:
        where = "/".join(path.split(os.sep)[-3:])
        print(f"  {cum * 1e3:8.2f}{own * 1e3:8.2f}{calls:7.0f}  {function} ({where}:{line})")


if __name__ == "__main__":
    main()

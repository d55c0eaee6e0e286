"""The RL loop, readable top to bottom.

    torchrun --nproc-per-node 2 -m megatron_rl.cli train configs/quickstart.yaml

Every learner rank runs `Trainer(cfg).fit()`. Rank 0 is also the driver: it owns the prompt
sampler, the rollout fleet, the rewards, the weight push and the metrics; the other ranks receive
each step's samples from it. One step:

    rollout    driver: prompts -> fleet.generate (n per prompt, a group per request, each sample with its own
               sampling_seed from data.seed and its place in the run: a rerun or a resume asks for the same
               samples)
               -> rewards -> GRPO-style advantages
               (async: the batch of step k+1 is generated while step k trains; samples older than
               rollout.max_staleness weight versions are dropped and counted)
    train      all ranks: pi_old log-probs recomputed (forward only), then data.num_mini_batches
               optimizer steps of the policy loss (mini-batch k is k-1 updates off-policy)
    sync       all ranks gather the full weights to rank 0 (learner.export), which maps them to
               HF names and pushes them to every engine as weight version step + 1
    log        rollout/*, train/*, mismatch/*, perf/*, sync/* to JSONL / wandb / the console (the resolved
               config: <tracking.dir>/<run_name>/config.yaml and the wandb run's config)
    checkpoint every checkpoint.save_interval steps: model, optimizer, sampler cursor, weight version

Stopping: SIGTERM exits at once (the engines this rank started are stopped). SIGUSR1 to any rank saves a
checkpoint after the step in progress, on every rank, then exits with STOPPED_EXIT_CODE (138), which
launch/slurm/rl.sbatch answers with a requeue. A resume cuts the metrics file after its checkpoint's step.
"""

import hashlib
import json
import logging
import os
import secrets
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl.algorithms.advantages import compute_advantages
from megatron_rl.algorithms.aggregation import GlobalCounts
from megatron_rl.config import RunConfig
from megatron_rl.config.loader import dump_config
from megatron_rl.convert import load_hf_weights
from megatron_rl.data.buffer import Group, RolloutBuffer, generated_by
from megatron_rl.data.datasets import PromptSampler, check_token_ids, load_prompts
from megatron_rl.data.rewards import RewardComputer, load_reward_fn
from megatron_rl.files import write_atomically
from megatron_rl.learner.batching import RolloutSample, micro_batches_for_rank
from megatron_rl.learner.checkpoint import find_latest, load_checkpoint, save_checkpoint
from megatron_rl.learner.export import full_parameters
from megatron_rl.learner.model import build_model_chunks
from megatron_rl.learner.optimizer import build_optimizer, wrap_data_parallel
from megatron_rl.learner.step import PolicyLearner, shard_for_context_parallel
from megatron_rl.models.hf_checkpoint import SafetensorsCheckpoint
from megatron_rl.models.hf_mapping import megatron_to_hf
from megatron_rl.parallel.state import initialize_parallel
from megatron_rl.platform import local_device
from megatron_rl.rollout.engines import launch_engines, stop_engines
from megatron_rl.rollout.fleet import Fleet
from megatron_rl.rollout.router import launch_router
from megatron_rl.rollout.weight_sync import WeightSync
from megatron_rl.tracking import Tracker

log = logging.getLogger(__name__)
STOP_REQUESTED = threading.Event()  # set by SIGUSR1: save a checkpoint after the current step and exit
STOPPED_EXIT_CODE = 128 + signal.SIGUSR1  # the exit code after that checkpoint (launch/slurm requeues the job)


class Trainer:
    def __init__(self, cfg: RunConfig):
        if cfg.model.hf_path is None:
            raise ValueError("model.hf_path must name the initial HF checkpoint: the engines serve it and the "
                             "learner starts from it (the quickstart writes one with `megatron-rl toy-task`)")
        self.cfg = cfg
        initialize_parallel(cfg.parallel, seed=cfg.data.seed)
        self.is_driver = dist.get_rank() == 0
        self.run_dir = Path(cfg.tracking.dir) / (cfg.tracking.run_name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.total_steps = cfg.data.train_steps

        # learner: every rank
        self.chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.data.pack_sequences)
        load_hf_weights(self.chunks, SafetensorsCheckpoint(cfg.model.hf_path), cfg.model)  # this rank's tensors
        self.model = wrap_data_parallel(self.chunks, cfg.optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optimizer,
                                                         total_steps=self.total_steps * cfg.data.num_mini_batches)
        self.learner = PolicyLearner(cfg, self.model, self.optimizer, self.scheduler)
        self.step, self.weight_version = 0, 0
        self.rewards_seen: list[float] = []  # the driver's rollout/reward_mean per step of this process

        # driver: data, rewards, engines, metrics
        self.tracker = Tracker(cfg.tracking, cfg.model_dump(mode="json", by_alias=True), enabled=self.is_driver,
                               total_steps=self.total_steps, run_dir=self.run_dir)
        if self.is_driver:
            self._start_driver()
        self._resume()

    def _start_driver(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        write_atomically(self.run_dir / "config.yaml", dump_config(cfg))  # what this run was started with
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or cfg.model.hf_path)
        prompts, report = load_prompts(cfg.data.train_path, self.tokenizer, prompt_key=cfg.data.prompt_key,
                                       messages_key=cfg.data.messages_key, answer_key=cfg.data.answer_key,
                                       max_prompt_length=cfg.data.max_prompt_length,
                                       system_prompt=cfg.data.system_prompt)
        self.tracker.console(str(report))
        check_token_ids(prompts, cfg.model.vocab_size, cfg.data.train_path)
        self.sampler = PromptSampler(prompts, seed=cfg.data.seed)
        self.rewards = RewardComputer(load_reward_fn(cfg.data.reward), num_workers=cfg.data.reward_workers)
        token = _engine_token(cfg)
        engines = launch_engines(cfg.rollout, cfg.model.hf_path, self.run_dir / "engines", token)
        try:
            router = launch_router(cfg.rollout, engines, self.run_dir / "engines", token) \
                if cfg.rollout.router.enabled else None
        except BaseException:
            stop_engines(engines)
            raise
        self.weight_sync = WeightSync(engines, cfg.rollout.weight_sync, flush_cache=not cfg.rollout.async_mode)
        self.fleet = Fleet(engines, cfg.rollout.max_concurrency, cfg.rollout.max_retries,
                           resync=self.weight_sync.resync, router=router)
        self.buffer = RolloutBuffer(cfg.rollout.max_staleness)
        self.sampling_params = _sampling_params(cfg)
        self._generating: Future | None = None
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-rollout")

    def _resume(self) -> None:
        ckpt = self.cfg.checkpoint
        if ckpt.resume is False or find_latest(ckpt.dir) is None:
            if ckpt.resume is True:
                raise FileNotFoundError(f"checkpoint.resume is true but {ckpt.dir} holds no checkpoint")
            return
        state = load_checkpoint(ckpt.dir, None, self.model, self.optimizer, self.scheduler, model_config=self.cfg.model)
        # a checkpoint written by `megatron-rl convert` has weights only: no sampler cursor, version = its step
        self.step, self.weight_version = state["step"], state.get("weight_version", state["step"])
        if self.is_driver and self.cfg.tracking.jsonl_path:
            _drop_metrics_after(self.run_dir / self.cfg.tracking.jsonl_path, self.step, self.tracker.console)
        if self.is_driver and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
            self.tracker.console(f"resumed from {ckpt.dir} at step {self.step} (weight version {self.weight_version})")
        self.sync_weights()  # the engines start from model.hf_path: give them the resumed weights

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        completed = stopped = False
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                samples, rollout_metrics = self.rollout()
                train_metrics = self.train(samples) if samples else {"train/skipped_no_samples": 1.0}
                self.weight_version = self.step + 1
                sync_metrics = self.sync_weights()
                self.step += 1
                self.tracker.log(self.step, {**rollout_metrics, **train_metrics, **sync_metrics,
                                             "perf/step_seconds": time.perf_counter() - start})
                self.rewards_seen.append(rollout_metrics.get("rollout/reward_mean", float("nan")))
                stopped = self._stop_requested() and self.step < self.total_steps
                self.maybe_checkpoint(force=stopped)
                if stopped:
                    self.tracker.console(f"SIGUSR1: stopped after step {self.step}, its checkpoint is saved")
                    raise SystemExit(STOPPED_EXIT_CODE)
            completed = True
            self.tracker.console(_reward_summary(self.rewards_seen))
        finally:
            self.close(exit_code=0 if completed else 1)
            # a stop exits every rank together, once rank 0 has written `latest` and stopped its engines:
            # torchrun stops the remaining workers as soon as one exits with an error code
            if stopped:
                dist.barrier()

    def rollout(self) -> tuple[list[RolloutSample], dict[str, float]]:
        """This step's samples on every rank (from the driver) and the driver's rollout metrics."""
        payload = [self._driver_rollout() if self.is_driver else None]
        dist.broadcast_object_list(payload, src=0)
        return payload[0]

    def train(self, samples: list[RolloutSample]) -> dict[str, float]:
        """data.num_mini_batches optimizer steps on `samples`, pi_old = the weights before the first. The train/*
        metrics are the last mini-batch's only (N - 1 updates stale), but train/skipped counts the skipped
        optimizer steps of all of them."""
        cfg = self.cfg
        start = time.perf_counter()
        mini_batches = _split(samples, cfg.data.num_mini_batches)
        plans = [self._micro_batches(mini) for mini in mini_batches]
        old = [self.learner.log_probs(micro) for micro, _ in plans]
        skipped = 0
        for (micro, counts), old_log_probs in zip(plans, old, strict=True):
            result = self.learner.train_step(micro, counts, old_log_probs=old_log_probs)
            skipped += result.skipped
            if result.skipped and self.is_driver:
                self.tracker.console(f"step {self.step + 1}: optimizer step skipped ({result.skip_reason})")
        return {**_mismatch_metrics(plans, old), **result.metrics, "train/loss": result.loss,
                "train/lr": result.learning_rate, "train/skipped": float(skipped),
                "train/grad_norm": result.grad_norm or 0.0, "perf/train_seconds": time.perf_counter() - start}

    def sync_weights(self) -> dict[str, float]:
        """Gather the full weights to rank 0 and push them to every engine as self.weight_version."""
        named = full_parameters(self.chunks)
        if not self.is_driver:
            for _ in named:
                pass
            return {}
        hf_named = (pair for name, tensor in named for pair in megatron_to_hf(name, tensor, self.cfg.model))
        return self.weight_sync.push(hf_named, self.weight_version).metrics()

    def maybe_checkpoint(self, force: bool = False) -> None:
        ckpt = self.cfg.checkpoint
        if force or (ckpt.save_interval and (self.step % ckpt.save_interval == 0 or self.step == self.total_steps)):
            state = {"weight_version": self.weight_version,
                     "sampler": self.sampler.state_dict() if self.is_driver else {}}
            save_checkpoint(ckpt.dir, self.step, self.model, self.optimizer, self.scheduler, state, ckpt.keep_last,
                            model_config=self.cfg.model)

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGUSR1 (all-reduced, so that every rank stops after the same step)."""
        flag = torch.tensor([float(STOP_REQUESTED.is_set())], device=local_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def close(self, exit_code: int = 0) -> None:
        if self.is_driver:
            self._background.shutdown(wait=False, cancel_futures=True)
            self.fleet.shutdown()
            self.weight_sync.close()
        self.tracker.finish(exit_code)

    # ------------------------------------------------------------------ the driver's rollout
    def _driver_rollout(self) -> tuple[list[RolloutSample], dict[str, float]]:
        """Groups for this step (async: the batch generated in the background, and the next one started)."""
        cfg, start = self.cfg, time.perf_counter()
        wanted = cfg.data.rollout_batch_size
        rounds, stats = 0, {"generated_groups": 0, "dropped_all_equal": 0, "reward_errors": 0, "tokens": 0}
        dropped_stale_before = self.buffer.dropped_stale
        groups: list[Group] = []
        while len(groups) < wanted and rounds < (cfg.data.dynamic_sampling_max_rounds if cfg.data.dynamic_sampling
                                                 else 1):
            rounds += 1
            batch, counts = self._next_generated_batch()
            for key, count in counts.items():
                stats[key] += count
            self.buffer.put(batch)
            for group in self.buffer.take(wanted - len(groups), learner_version=self.weight_version):
                if cfg.data.dynamic_sampling and group.all_equal:
                    stats["dropped_all_equal"] += 1
                    continue
                groups.append(group)
        groups = groups[:_usable_groups(len(groups), cfg)]
        samples = self._samples_of(groups)
        metrics = _rollout_metrics(groups, stats, self.buffer.dropped_stale - dropped_stale_before, self.weight_version)
        metrics["rollout/seconds"] = time.perf_counter() - start
        fleet = self.fleet.counts_since_last_call()
        metrics.update({"rollout/requests": float(fleet["requests"]), "rollout/retries": float(fleet["retries"]),
                        "rollout/engine_failures": float(fleet["engine_failures"]),
                        "rollout/restarts": float(fleet["restarts"])})
        # the designed mismatch source (constant over the run; each engine's dtype is in the run config)
        metrics["rollout/logit_noise_std"] = max(engine.logit_noise_std for engine in cfg.rollout.engines)
        return samples, metrics

    def _next_generated_batch(self) -> tuple[list[Group], dict[str, int]]:
        """Sync: generate now. Async: take the batch started last time and start the next one. With the batch,
        its counts (generated_groups, tokens, reward_errors): a step reports those of the batch it trains on."""
        if not self.cfg.rollout.async_mode:
            return self._generate()
        batch = self._generating.result() if self._generating is not None else self._generate()
        self._generating = self._background.submit(self._generate)
        return batch

    def _generate(self) -> tuple[list[Group], dict[str, int]]:
        cfg = self.cfg
        first_draw = self.sampler.drawn
        prompts = self.sampler.next_batch(cfg.data.rollout_batch_size)
        n = cfg.rollout.n_samples_per_prompt
        params = [{**self.sampling_params, "sampling_seed": rollout_seed(cfg.data.seed, first_draw + i // n, i % n)}
                  for i in range(len(prompts) * n)]
        generations = self.fleet.generate([p.prompt_ids for p in prompts for _ in range(n)], params,
                                          prompts_per_request=n)
        texts = self.tokenizer.batch_decode([g.output_ids for g in generations], skip_special_tokens=True)
        prompt_texts = self.tokenizer.batch_decode([p.prompt_ids for p in prompts], skip_special_tokens=True)
        items = [(prompt_texts[i // n], text, prompts[i // n].answer, prompts[i // n].metadata)
                 for i, text in enumerate(texts)]
        rewards, errors = self.rewards(items)
        groups = [Group(prompt, generations[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n])
                  for i, prompt in enumerate(prompts)]
        counts = {"reward_errors": sum(errors.values()), "generated_groups": len(prompts),
                  "tokens": sum(len(g.output_ids) for g in generations)}
        return groups, counts

    def _samples_of(self, groups: list[Group]) -> list[RolloutSample]:
        if not groups:
            return []
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
        group_ids = torch.arange(len(groups)).repeat_interleave(torch.tensor([len(g.rewards) for g in groups]))
        advantages = compute_advantages(self.cfg.algorithm.advantage, rewards, group_ids).tolist()
        generations = [(g.prompt, gen) for g in groups for gen in g.generations]
        return [RolloutSample(prompt.prompt_ids, gen.output_ids, advantage, gen.output_logprobs)
                for (prompt, gen), advantage in zip(generations, advantages, strict=True)]

    def _micro_batches(self, samples: list[RolloutSample]):
        """This DP rank's micro-batches of `samples` and the global counts that normalise their loss."""
        from megatron.core import parallel_state

        parallel = self.cfg.parallel
        pad_multiple = 2 * parallel.cp * parallel.tp if parallel.cp > 1 else parallel.tp
        micro = micro_batches_for_rank(samples, parallel.dp, parallel_state.get_data_parallel_rank(),
                                       self.cfg.data.max_tokens_per_micro_batch, pad_multiple,
                                       pack=self.cfg.data.pack_sequences)
        counts = GlobalCounts(tokens=sum(len(s.response_ids) for s in samples), sequences=len(samples))
        return micro, counts


def _engine_token(cfg: RunConfig) -> str:
    return os.environ.get(cfg.rollout.token_env) or secrets.token_hex(16)


def rollout_seed(seed: int, draw: int, sample: int) -> int:
    """The sampling_seed of sample `sample` of the `draw`-th prompt the run has drawn (counted over epochs): the
    same config gives the same requests, after a resume too; 31 bits (SGLang uses it only in deterministic mode)."""
    digest = hashlib.sha256(f"rollout:{seed}:{draw}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _sampling_params(cfg: RunConfig) -> dict:
    sampling = cfg.rollout.sampling
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens or cfg.data.max_response_length}


def _split(samples: list, parts: int) -> list[list]:
    size = len(samples) // parts
    return [samples[i * size:(i + 1) * size] for i in range(parts)]


def _usable_groups(count: int, cfg: RunConfig) -> int:
    """The most groups <= count that split into num_mini_batches mini-batches divisible over dp ranks."""
    n, parts, dp = cfg.rollout.n_samples_per_prompt, cfg.data.num_mini_batches, cfg.parallel.dp
    while count and (count % parts or (count // parts * n) % dp):
        count -= 1
    return count


def _rollout_metrics(groups: list[Group], stats: dict, dropped_stale: int, learner_version: int) -> dict[str, float]:
    rewards = torch.tensor([r for g in groups for r in g.rewards] or [float("nan")])
    lengths = torch.tensor([len(gen.output_ids) for g in groups for gen in g.generations] or [0], dtype=torch.float64)
    truncated = [gen.finish_reason.get("type") == "length" for g in groups for gen in g.generations]
    staleness = [learner_version - generated_by(gen) for g in groups for gen in g.generations]
    return {
        "rollout/reward_mean": rewards.mean().item(),
        "rollout/reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "rollout/response_length_mean": lengths.mean().item(),
        "rollout/truncated_fraction": sum(truncated) / max(len(truncated), 1),
        "rollout/groups": float(len(groups)),
        "rollout/generated_groups": float(stats["generated_groups"]),
        "rollout/dropped_all_equal_groups": float(stats["dropped_all_equal"]),
        "rollout/dropped_stale_groups": float(dropped_stale),
        "rollout/reward_errors": float(stats["reward_errors"]),
        "rollout/staleness_mean": sum(staleness) / max(len(staleness), 1),
        "rollout/generated_tokens": float(stats["tokens"]),
    }


def _reward_summary(rewards: list[float], window: int = 10) -> str:
    """'reward: 0.05 over the first 10 steps -> 0.81 over the last 10' (means of rollout/reward_mean)."""
    if not rewards:
        return "reward: no step ran"
    window = min(window, len(rewards))
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    return f"reward: {first:.3f} over the first {window} steps -> {last:.3f} over the last {window}"


def _mismatch_metrics(plans, old) -> dict[str, float]:
    """Train-inference gap on response tokens: mean |log pi_learner - log pi_rollout| and k3 KL(rollout || learner),
    summed over this rank's tokens and all-reduced on the local device (nccl reduces no CPU tensor; TP copies count
    equally in numerator and denominator)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for (micro, _), log_probs in zip(plans, old, strict=True):
        if log_probs is None:
            continue  # not the last pipeline stage
        for mb, learner_lp in zip(micro, log_probs, strict=True):
            if mb.rollout_log_probs is None:
                continue
            local = shard_for_context_parallel(mb)
            mask = local.loss_mask.bool()
            diff = (learner_lp.cpu()[mask] - local.rollout_log_probs[mask]).double()
            sums += torch.stack([diff.abs().sum(), (torch.exp(diff) - 1 - diff).sum(), mask.sum().double()])
    sums = sums.to(local_device())
    dist.all_reduce(sums)
    tokens = max(sums[2].item(), 1.0)
    return {"mismatch/log_prob_abs_diff_mean": sums[0].item() / tokens, "mismatch/kl_k3": sums[1].item() / tokens}


def _drop_metrics_after(path: Path, step: int, console) -> None:
    """Cut the metrics file after the rows of steps <= step. Resuming from the checkpoint of `step` discards the
    training of later steps (logged before a kill) and logs those steps again."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = next((i for i, line in enumerate(lines) if json.loads(line)["step"] > step), len(lines))
    if kept < len(lines):
        os.truncate(path, sum(len(line) for line in lines[:kept]))
        console(f"{path}: dropped {len(lines) - kept} row(s) of steps after {step}, which the resume trains again")


def train_from_config(cfg: RunConfig) -> None:
    """Entry point of `megatron-rl train` on every rank."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_rl").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch / Megatron deprecation notices, every step
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` stops the engines this rank started
    signal.signal(signal.SIGUSR1, lambda *_: STOP_REQUESTED.set())
    Trainer(cfg).fit()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)

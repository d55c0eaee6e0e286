"""Gaussian noise on the rollout engine's logits: a measurable, reproducible train-inference mismatch.

`megatron-rl serve --logit-noise-std S --logit-noise-seed K` makes the engine's behaviour policy mu differ from the
learner's pi by design (for trust-region masking and mismatch-correction experiments on CPU). At decode step t
(t = 0 for the first output token) of a request with temperature T and sampling_seed s, the engine replaces its
tempered logits by

    z_t = logits_t / T + S * eps_t,        eps_t ~ N(0, I_V) over the full vocabulary V,

and both the sampled token and the reported logprob come from z_t: mu(. | context) = softmax(z_t), logprob_t =
log_softmax(z_t)[y_t], and top-k / top-p filter softmax(z_t). Greedy requests (T < 1e-6) take y_t = argmax(z_t)
with T = 1. The noise is added after the temperature, so S is in units of log-probability whatever T is: against
the learner's tempered policy pi_t = softmax(logits_t / T),

    log mu_t(i) - log pi_t(i) = S * eps_t,i - log sum_j pi_t(j) exp(S * eps_t,j).

eps_t is a function of (K, s, t) only, never of the batch a request runs in:

    eps_t = torch.randn(V, generator=torch.Generator().manual_seed(step_seed(K, s, t)))    (float32, CPU)
    step_seed(K, s, t) = int.from_bytes(sha256(f"logit-noise:{K}:{s}:{t}".encode()).digest()[:8], "little")

A request without sampling_seed gets a random s (drawn from torch's global generator, like its sampling
uniforms), so its noise is independent of every other request's but not reproducible. S = 0 (the default) adds
nothing and draws nothing: generation is bitwise what it is without this module.
"""

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def step_seed(noise_seed: int, request_seed: int, step: int) -> int:
    """The 64-bit torch seed of eps_t for (K, s, t) (module docstring)."""
    digest = hashlib.sha256(f"logit-noise:{noise_seed}:{request_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class LogitNoise:
    """The engine's logit noise: std S >= 0 (0: off) and seed K."""

    std: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.std, bool) or not isinstance(self.std, int | float) or not (
                math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"logit_noise_std: expected a finite number >= 0 (0: off), got {self.std!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"logit_noise_seed: expected an integer, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        return self.std > 0

    @staticmethod
    def request_seed(sampling_seed: int | None) -> int:
        """s of a request: its sampling_seed, or a random one when it has none."""
        return int(torch.randint(0, 2**62, ())) if sampling_seed is None else sampling_seed

    def __call__(self, request_seeds: Sequence[int], step: int, vocab_size: int) -> torch.Tensor:
        """[b, V] float32: S * eps_t of each row, for the rows' request seeds s and decode step t."""
        generator = torch.Generator()
        rows = [torch.randn(vocab_size, generator=generator.manual_seed(step_seed(self.seed, request_seed, step)))
                for request_seed in request_seeds]
        return torch.stack(rows).mul_(self.std)

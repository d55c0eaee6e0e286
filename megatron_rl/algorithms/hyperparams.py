"""Hyperparameters of every loss, correction and advantage estimator, with the papers' defaults.

This module is the one place these defaults are written (see ALGORITHMS.md for their sources).
The run configuration (`megatron_rl.config`) embeds these dataclasses, so a YAML file, a dotted
override and a direct call of `compute_policy_loss` all see the same values and the same range
checks. Plain frozen dataclasses: no torch, no pydantic.
"""

from dataclasses import dataclass, field
from typing import Literal

LossName = Literal[
    "ppo", "dapo", "gspo", "gspo_token", "gmpo", "cispo", "sapo", "kpo", "vespo", "trm"
]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvantageEstimatorName = Literal[
    "grpo", "grpo_no_std", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"
]


# Each loss's aggregation when `loss_agg_mode` is unset (ALGORITHMS.md section 5). None marks a
# sequence-level loss (a mean over sequences). Losses in FIXED_AGGREGATION accept no other mode.
DEFAULT_AGGREGATION: dict[str, AggMode | None] = {
    "ppo": "token-mean", "dapo": "token-mean", "gspo": None, "gspo_token": "seq-mean-token-mean",
    "gmpo": None, "cispo": "token-mean", "sapo": "seq-mean-token-mean", "kpo": "seq-mean-token-mean",
    "vespo": "token-mean", "trm": "seq-mean-token-sum",
}
FIXED_AGGREGATION = frozenset({"gspo", "gspo_token", "gmpo", "trm"})
SEQUENCE_LEVEL_LOSSES = frozenset(name for name, mode in DEFAULT_AGGREGATION.items() if mode is None)


class HyperparameterError(ValueError):
    """Every out-of-range field of one dataclass; `errors` holds (field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{key} {message}" for key, message in errors))


def _check(*conditions: tuple[bool, str, str, object]) -> None:
    """Raise one HyperparameterError listing each (ok, field, expected, got) that failed."""
    errors = [(key, f"must be {expected}, got {got!r}") for ok, key, expected, got in conditions if not ok]
    if errors:
        raise HyperparameterError(errors)


@dataclass(frozen=True)
class PPOConfig:
    """Token-level clipped surrogate with dual-clip (ALGORITHMS.md 1.1). GRPO: eps 0.2 / 0.2."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = 3.0  # None disables dual-clip

    def __post_init__(self):
        _check((0 < self.eps_low < 1, "eps_low", "in (0, 1)", self.eps_low),
               (self.eps_high > 0, "eps_high", "> 0", self.eps_high),
               (self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", "> 1 or null",
                self.dual_clip_c))


@dataclass(frozen=True)
class DAPOConfig(PPOConfig):
    """DAPO clip-higher (ALGORITHMS.md 1.2): eps_low 0.2, eps_high 0.28, token-mean."""

    eps_high: float = 0.28


@dataclass(frozen=True)
class GSPOConfig:
    """Sequence ratio clipping (ALGORITHMS.md 1.3); GSPO paper section 5.1: 3e-4 / 4e-4."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4

    def __post_init__(self):
        _check((0 < self.eps_low < 1, "eps_low", "in (0, 1)", self.eps_low),
               (self.eps_high > 0, "eps_high", "> 0", self.eps_high))


@dataclass(frozen=True)
class GMPOConfig:
    """Log-space token clipping of the geometric mean (ALGORITHMS.md 1.4): +-0.4."""

    eps_low: float = 0.4
    eps_high: float = 0.4

    def __post_init__(self):
        _check((self.eps_low > 0, "eps_low", "> 0", self.eps_low),
               (self.eps_high > 0, "eps_high", "> 0", self.eps_high))


@dataclass(frozen=True)
class CISPOConfig:
    """Detached clipped IS weight (ALGORITHMS.md 1.5).

    MiniMax-M1 sets no lower bound (eps_low null) and tunes eps_high; 0.28 is the DAPO value.
    """

    eps_low: float | None = None
    eps_high: float = 0.28

    def __post_init__(self):
        _check((self.eps_low is None or 0 < self.eps_low <= 1, "eps_low", "in (0, 1] or null", self.eps_low),
               (self.eps_high > 0, "eps_high", "> 0", self.eps_high))


@dataclass(frozen=True)
class SAPOConfig:
    """Soft gate temperatures (ALGORITHMS.md 1.6): tau 1.0 for A > 0, 1.05 otherwise."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        _check((self.tau_pos > 0, "tau_pos", "> 0", self.tau_pos),
               (self.tau_neg > 0, "tau_neg", "> 0", self.tau_neg))


@dataclass(frozen=True)
class KPOConfig:
    """Kalman-filtered token ratios (ALGORITHMS.md 2.2-2.5).

    q is the process noise Q and r the observation noise R (the paper's V); only q / r matters.
    clip=False is the unclipped KPO objective. released_gains=True uses the authors' float32
    closed-form gain table instead of the exact recursion (ALGORITHMS.md 2.7), for comparison.
    """

    q: float = 1e-6
    r: float = 1.0
    clip: bool = True
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    released_gains: bool = False

    def __post_init__(self):
        _check((self.q > 0, "q", "> 0", self.q),
               (self.r > 0, "r", "> 0", self.r),
               (0 < self.eps_low < 1, "eps_low", "in (0, 1)", self.eps_low),
               (self.eps_high > 0, "eps_high", "> 0", self.eps_high))


@dataclass(frozen=True)
class VESPOConfig:
    """Kernel phi(W) = W^c1 exp(c2 (1 - W)) (ALGORITHMS.md 3.1-3.3).

    pos = (c1, c2) for A >= 0 and neg for A < 0. c1 >= 1 keeps the variance bound K finite.
    use_rollout_log_prob adds log(pi_old / pi_roll) to log W (the fully-async runs' mu = pi_roll).
    """

    pos: tuple[float, float] = (2.0, 3.0)
    neg: tuple[float, float] = (3.0, 2.0)
    use_rollout_log_prob: bool = False

    def __post_init__(self):
        _check(*(check for key, (c1, c2) in (("pos", self.pos), ("neg", self.neg)) for check in (
            (c1 >= 1, f"{key}[0]", ">= 1 (c1: the variance bound needs c1 >= 1)", c1),
            (c2 > 0, f"{key}[1]", "> 0 (c2)", c2))))


@dataclass(frozen=True)
class TRMConfig:
    """Trust-region masking thresholds (ALGORITHMS.md 4.3-4.4).

    max_k2: keep a sequence iff max_t 0.5 (log rho_t)^2 <= max_k2 (TRM-Max, paper: 0.05).
    avg_k3: keep iff mean_t (rho_t - 1 - log rho_t) <= avg_k3 (TRM-Avg, paper: 0.001).
    Both set: both must hold (TRM-combined, paper: 0.1 and 0.002).
    """

    max_k2: float | None = 0.05
    avg_k3: float | None = None

    def __post_init__(self):
        _check((self.max_k2 is not None or self.avg_k3 is not None, "max_k2",
                "set when avg_k3 is null (TRM needs at least one criterion)", None),
               (self.max_k2 is None or self.max_k2 > 0, "max_k2", "> 0 or null", self.max_k2),
               (self.avg_k3 is None or self.avg_k3 > 0, "avg_k3", "> 0 or null", self.avg_k3))


@dataclass(frozen=True)
class TruncatedISConfig:
    """TIS (weight min(w, C)) or MIS (weight w * [w <= C]) on w = pi_old / pi_roll."""

    level: Literal["token", "sequence"] = "token"
    threshold: float = 2.0

    def __post_init__(self):
        _check((self.threshold > 0, "threshold", "> 0", self.threshold))


@dataclass(frozen=True)
class BandConfig:
    """A ratio band [low, high] on w = pi_old / pi_roll."""

    low: float
    high: float

    def __post_init__(self):
        _check((self.low > 0, "low", "> 0", self.low),
               (self.high > self.low, "high", f"> low ({self.low})", self.high))


@dataclass(frozen=True)
class IcePopConfig(BandConfig):
    """IcePop (Ring-1T): keep token weight w where w is in [low, high], else 0."""

    low: float = 0.5
    high: float = 5.0


@dataclass(frozen=True)
class GeoMaskConfig(BandConfig):
    """Geometric mask (verl Geo-RS): keep a sequence iff exp(mean_t log w) is in [low, high]."""

    low: float = 0.999
    high: float = 1.001


@dataclass(frozen=True)
class CorrectionsConfig:
    """Train-inference mismatch corrections, composable with every loss (ALGORITHMS.md 1.7).

    All need rollout log-probs; each is off (null) unless set. trm applies TRM's sequence mask
    to any loss; the loss keeps its own denominator.
    """

    tis: TruncatedISConfig | None = None
    mis: TruncatedISConfig | None = None
    icepop: IcePopConfig | None = None
    geo_mask: GeoMaskConfig | None = None
    trm: TRMConfig | None = None


def token_level_corrections(corrections: CorrectionsConfig) -> list[str]:
    """The enabled corrections that weight single tokens: they cannot apply to a sequence-level loss."""
    names = [name for name, spec in (("tis", corrections.tis), ("mis", corrections.mis))
             if spec is not None and spec.level == "token"]
    return names + (["icepop"] if corrections.icepop is not None else [])


@dataclass(frozen=True)
class PolicyLossConfig:
    """Everything `compute_policy_loss` reads.

    loss_agg_mode None means the loss's own default (ALGORITHMS.md section 5).
    max_log_ratio clamps every per-token log-ratio to +-max_log_ratio before exp.
    loss_norm_const is seq-mean-token-sum-norm's constant; None means the padded response length.
    """

    loss_agg_mode: AggMode | None = None
    max_log_ratio: float = 20.0
    loss_norm_const: float | None = None
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    gmpo: GMPOConfig = field(default_factory=GMPOConfig)
    cispo: CISPOConfig = field(default_factory=CISPOConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    kpo: KPOConfig = field(default_factory=KPOConfig)
    vespo: VESPOConfig = field(default_factory=VESPOConfig)
    trm: TRMConfig = field(default_factory=TRMConfig)
    corrections: CorrectionsConfig = field(default_factory=CorrectionsConfig)

    def __post_init__(self):
        _check((self.max_log_ratio > 0, "max_log_ratio", "> 0", self.max_log_ratio),
               (self.loss_norm_const is None or self.loss_norm_const > 0, "loss_norm_const",
                "> 0 or null", self.loss_norm_const))


@dataclass(frozen=True)
class AdvantageConfig:
    """Outcome-reward advantage estimator (ALGORITHMS.md section 0; `algorithms.advantages`)."""

    estimator: AdvantageEstimatorName = "grpo"
    eps: float = 1e-6

    def __post_init__(self):
        _check((self.eps > 0, "eps", "> 0", self.eps))

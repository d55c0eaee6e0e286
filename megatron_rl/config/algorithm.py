"""The `algorithm` section: the loss, its hyperparameters and the advantage estimator.

`AlgorithmConfig` is a pydantic dataclass that subclasses the frozen stdlib dataclass
`PolicyLossConfig` of `megatron_rl.algorithms.hyperparams`, so:

- every hyperparameter default and range check stays in hyperparams.py, written once; pydantic
  validates the inherited fields (nested dataclasses included) and then runs their __post_init__;
- a validated `cfg.algorithm` IS a PolicyLossConfig and goes straight to
  `compute_policy_loss(..., config=cfg.algorithm)`;
- dotted keys follow the dataclass fields: `algorithm.kpo.q`, `algorithm.corrections.tis.level`.
"""

from dataclasses import field

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from megatron_rl.algorithms.hyperparams import (
    FIXED_AGGREGATION,
    SEQUENCE_LEVEL_LOSSES,
    AdvantageConfig,
    LossName,
    PolicyLossConfig,
    token_level_corrections,
)
from megatron_rl.config.errors import ConfigError


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class AlgorithmConfig(PolicyLossConfig):
    """`loss` picks the entry of the policy-loss registry; `advantage` the estimator."""

    loss: LossName = "kpo"
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)

    def __post_init__(self):
        super().__post_init__()
        errors = []
        if self.loss in FIXED_AGGREGATION and self.loss_agg_mode is not None:
            errors.append(("loss_agg_mode", f"must be null for loss '{self.loss}', whose aggregation "
                                            f"is fixed, got '{self.loss_agg_mode}'"))
        if self.loss in SEQUENCE_LEVEL_LOSSES:
            errors += [(f"corrections.{name}", f"weights tokens, but loss '{self.loss}' is sequence-level: "
                        + ("set level: sequence" if name != "icepop" else "use a token-level loss or remove it"))
                       for name in token_level_corrections(self.corrections)]
        if errors:
            raise ConfigError(errors)

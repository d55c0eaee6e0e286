"""The run configuration: a typed schema, read from YAML with dotted command-line overrides.

    cfg = load_config("configs/example.yaml", ["parallel.tp=2", "algorithm.kpo.q=1e-4"])
    cfg.parallel.dp, cfg.algorithm.kpo.q          # derived sizes, validated values
    print(dump_config(cfg))                       # the resolved configuration, every key

Every problem raises one ConfigError listing all of them, each as (dotted key, message).
"""

from megatron_rl.config.algorithm import AlgorithmConfig
from megatron_rl.config.errors import ConfigError
from megatron_rl.config.loader import config_from_dict, dump_config, load_config
from megatron_rl.config.schema import RunConfig
from megatron_rl.config.sections import (
    CheckpointConfig,
    DataConfig,
    EngineSpec,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    SamplingConfig,
    TrackingConfig,
)

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EngineSpec",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RolloutConfig",
    "RunConfig",
    "SamplingConfig",
    "TrackingConfig",
    "config_from_dict",
    "dump_config",
    "load_config",
]

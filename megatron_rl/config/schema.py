"""`RunConfig`, the root of the run configuration, and the rules that span its sections.

pydantic runs these rules only once every section is valid on its own; until then the
section-level errors are the ones reported.
"""

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from megatron_rl.config.algorithm import AlgorithmConfig
from megatron_rl.config.errors import ErrorCollector
from megatron_rl.config.sections import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    TrackingConfig,
)


class RunConfig(BaseModel):
    """Everything one RL run needs, as read from one YAML file plus dotted overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_across_sections(self) -> Self:
        problems = ErrorCollector()
        _check_model_split(self.model, self.parallel, problems)
        _check_lengths_and_batches(self, problems)
        _check_packing(self, problems)
        problems.raise_if_any()
        return self


def _check_model_split(model: ModelConfig, parallel: ParallelConfig, problems: ErrorCollector) -> None:
    """Megatron-Core's rules for splitting heads, experts and layers over ranks."""
    heads, groups, tp = model.num_attention_heads, model.num_query_groups, parallel.tp
    problems.require(heads % tp == 0, "parallel.tp",
                     f"must divide model.num_attention_heads = {heads}, got {tp}")
    problems.require(groups is None or groups % tp == 0 or tp % groups == 0, "parallel.tp",
                     f"must be a multiple or a divisor of model.num_query_groups = {groups}, got {tp}")
    if model.num_experts is None:
        problems.require(parallel.ep == 1, "parallel.ep",
                         f"must be 1 for a dense model (model.num_experts is null), got {parallel.ep}")
    else:
        problems.require(model.num_experts % parallel.ep == 0, "parallel.ep",
                         f"must divide model.num_experts = {model.num_experts}, got {parallel.ep}")
    if parallel.vpp is None:
        problems.require(model.num_layers % parallel.pp == 0, "parallel.pp",
                         f"must divide model.num_layers = {model.num_layers}, got {parallel.pp}")
    else:
        stages = parallel.pp * parallel.vpp
        problems.require(model.num_layers % stages == 0, "parallel.vpp",
                         f"pp * vpp = {stages} must divide model.num_layers = {model.num_layers}")


def _check_lengths_and_batches(cfg: RunConfig, problems: ErrorCollector) -> None:
    """Sequence lengths fit the model; batches split evenly; warmup fits in the run."""
    data = cfg.data
    sequence_length = data.max_prompt_length + data.max_response_length
    problems.require(sequence_length <= cfg.model.max_position_embeddings, "model.max_position_embeddings",
                     f"must be >= data.max_prompt_length + data.max_response_length = {sequence_length}, "
                     f"got {cfg.model.max_position_embeddings}")
    max_new_tokens, max_response_length = cfg.rollout.sampling.max_new_tokens, data.max_response_length
    problems.require(max_new_tokens is None or max_new_tokens <= max_response_length,
                     "rollout.sampling.max_new_tokens",
                     f"must be <= data.max_response_length = {max_response_length}, got {max_new_tokens}")
    problems.require(not cfg.rollout.async_mode or cfg.rollout.max_staleness >= 1, "rollout.max_staleness",
                     "must be >= 1 when rollout.async is true (a batch generated while the learner trains is one "
                     f"weight version behind), got {cfg.rollout.max_staleness}")
    optimizer_steps = data.train_steps * data.num_mini_batches
    problems.require(cfg.optimizer.lr_warmup_steps <= optimizer_steps, "optimizer.lr_warmup_steps",
                     f"must be <= the run's optimizer steps, data.train_steps x data.num_mini_batches = "
                     f"{optimizer_steps}, got {cfg.optimizer.lr_warmup_steps}")
    samples = data.rollout_batch_size * cfg.rollout.n_samples_per_prompt // data.num_mini_batches
    problems.require(samples % cfg.parallel.dp == 0, "data.rollout_batch_size",
                     f"rollout_batch_size * rollout.n_samples_per_prompt / num_mini_batches = {samples} "
                     f"samples per optimizer step must be divisible by parallel.dp = {cfg.parallel.dp}")


def _check_packing(cfg: RunConfig, problems: ErrorCollector) -> None:
    """Sequence packing needs cp == 1. Under context parallelism every row is cut into 2 cp zig-zag
    chunks, and the CP attention and the CP sequence reductions (scan carries, per-sequence sums and
    maxima over [B, T_local] rows) assume one sequence per row; packed rows would need each sequence
    cut and padded on its own (TE's THD CP layout), which the learner does not do."""
    problems.require(not (cfg.data.pack_sequences and cfg.parallel.cp > 1), "data.pack_sequences",
                     f"must be false when parallel.cp > 1 (packed sequences are not split for context "
                     f"parallelism), got data.pack_sequences = true with parallel.cp = {cfg.parallel.cp}")

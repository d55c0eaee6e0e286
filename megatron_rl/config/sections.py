"""The sections of the run configuration, except `algorithm` (algorithm.py).

Each section is a frozen pydantic model whose defaults describe a tiny CPU run, so a minimal YAML
file validates. A rule that involves one section only is that section's validator; rules that
span sections are on `RunConfig` (schema.py). Field names of `model` follow Megatron-LM's command
line (`--num-query-groups` is `num_query_groups`); null in an optional field means the default
its comment states.
"""

from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from megatron_rl.config.errors import ErrorCollector

UnitInterval = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """Base of every section: frozen (no field can be reassigned), and closed (an unknown key is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """Architecture of the GPT learner, dense or Mixture-of-Experts."""

    num_layers: PositiveInt = 2
    hidden_size: PositiveInt = 64
    ffn_hidden_size: PositiveInt = 256
    num_attention_heads: PositiveInt = 4
    num_query_groups: PositiveInt | None = None  # null: num_attention_heads (multi-head attention)
    kv_channels: PositiveInt | None = None  # null: hidden_size // num_attention_heads
    vocab_size: PositiveInt = 1024
    max_position_embeddings: PositiveInt = 2048
    rotary_base: PositiveFloat = 10000.0  # RoPE theta
    norm_epsilon: PositiveFloat = 1e-5
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    qk_layernorm: bool = False
    swiglu: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = False
    num_experts: PositiveInt | None = None  # null: a dense model
    moe_router_topk: PositiveInt = 2
    moe_ffn_hidden_size: PositiveInt | None = None  # null: ffn_hidden_size
    moe_shared_expert_intermediate_size: PositiveInt | None = None  # null: no shared expert
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalisation)
    moe_shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . gate), Qwen2-MoE
    moe_aux_loss_coeff: NonNegativeFloat = 0.0
    hf_path: str | None = None  # a local Hugging Face checkpoint directory

    @property
    def query_groups(self) -> int:
        """The number of key/value head groups, resolving null to num_attention_heads."""
        return self.num_query_groups or self.num_attention_heads

    @model_validator(mode="after")
    def _check(self) -> Self:
        heads = self.num_attention_heads
        problems = ErrorCollector()
        problems.require(heads % self.query_groups == 0, "num_query_groups",
                         f"must divide num_attention_heads = {heads}, got {self.query_groups}")
        problems.require(self.kv_channels is not None or self.hidden_size % heads == 0, "hidden_size",
                         f"must be a multiple of num_attention_heads = {heads} when kv_channels is null, "
                         f"got {self.hidden_size}")
        problems.require(self.num_experts is None or self.moe_router_topk <= self.num_experts,
                         "moe_router_topk", f"must be <= num_experts = {self.num_experts}, "
                         f"got {self.moe_router_topk}")
        problems.raise_if_any()
        return self


class ParallelConfig(Section):
    """How the learner's world of `world_size` ranks is split.

    Dense layers: world_size = tp * pp * cp * dp. Expert layers (Megatron-Core's layout):
    world_size = etp * ep * pp * expert_dp. dp and expert_dp are derived, never set.
    """

    tp: PositiveInt = 1
    pp: PositiveInt = 1
    vpp: PositiveInt | None = None  # virtual stages per pipeline rank (interleaved); null: off
    cp: PositiveInt = 1
    ep: PositiveInt = 1
    etp: PositiveInt = 1
    sequence_parallel: bool = False
    world_size: PositiveInt = 1

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense layers."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert layers."""
        return self.world_size // (self.ep * self.etp * self.pp)

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        world = self.world_size
        dense_model_parallel = self.tp * self.pp * self.cp
        expert_model_parallel = self.ep * self.etp * self.pp
        problems.require(world % dense_model_parallel == 0, "world_size",
                         f"must be a multiple of tp * pp * cp = {dense_model_parallel}, got {world}")
        problems.require(world % expert_model_parallel == 0, "ep",
                         f"ep * etp * pp = {expert_model_parallel} must divide world_size = {world}")
        problems.require(self.vpp is None or self.pp > 1, "vpp",
                         f"must be null unless pp > 1, got {self.vpp}")
        problems.require(not self.sequence_parallel or self.tp > 1, "sequence_parallel",
                         "must be false unless tp > 1")
        problems.require(self.sequence_parallel or self.ep == 1 or self.tp == 1, "sequence_parallel",
                         "must be true when ep > 1 and tp > 1 (Megatron-Core's MoE layers need it)")
        problems.raise_if_any()
        return self


class OptimizerConfig(Section):
    """Adam with a learning-rate schedule: linear warmup, then decay to min_lr over the run."""

    lr: PositiveFloat = 1e-6
    min_lr: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.01
    adam_beta1: UnitInterval = 0.9
    adam_beta2: UnitInterval = 0.999
    adam_eps: PositiveFloat = 1e-8
    clip_grad: NonNegativeFloat = 1.0  # 0: no gradient clipping
    lr_warmup_steps: NonNegativeInt = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    use_distributed_optimizer: bool = True

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        problems.require(self.min_lr <= self.lr, "min_lr", f"must be <= lr = {self.lr}, got {self.min_lr}")
        problems.raise_if_any()
        return self


_CPU_ONLY = {  # EngineSpec keys that only kind 'cpu' reads, and why an SGLang engine cannot honour them
    "dtype": "an SGLang engine serves in the dtype SGLang chooses, this key is not passed to it",
    "logit_noise_std": "SGLang has no logit noise option",
    "logit_noise_seed": "SGLang has no logit noise option",
}


class EngineSpec(Section):
    """One rollout engine: a real SGLang server, or the built-in CPU engine (`megatron-rl serve`)."""

    kind: Literal["sglang", "cpu"] = "cpu"
    tp: PositiveInt = 1
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 30000
    launch: bool = True  # the trainer starts (and restarts) this engine; false: attach to a running server
    max_batch_size: PositiveInt = 64  # kind 'cpu': sequences generated together
    threads: PositiveInt = 1  # kind 'cpu': torch threads of the server process
    dtype: Literal["float32", "bfloat16"] = "float32"  # kind 'cpu': dtype of the served weights and forward
    # kind 'cpu': N(0, std^2) noise on the tempered logits of every decode step (rollout/logit_noise.py); 0: off
    logit_noise_std: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    logit_noise_seed: int = 0  # kind 'cpu': with a request's sampling_seed, fixes that noise

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        problems.require(self.kind != "cpu" or self.tp == 1, "tp", f"must be 1 for kind 'cpu', got {self.tp}")
        if self.kind == "sglang":
            for key, why in _CPU_ONLY.items():
                default, value = type(self).model_fields[key].default, getattr(self, key)
                problems.require(value == default, key, f"must be {default!r} for kind 'sglang' ({why}), got {value!r}")
        problems.raise_if_any()
        return self


class SamplingConfig(Section):
    """Sampling parameters sent to the engines (SGLang's `sampling_params`)."""

    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1  # -1: off
    max_new_tokens: PositiveInt | None = None  # null: data.max_response_length

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        problems.require(self.top_k != 0, "top_k", "must be -1 (off) or >= 1, got 0")
        problems.raise_if_any()
        return self


class WeightSyncConfig(Section):
    """How new weights reach the engines after each learner step."""

    bucket_mb: PositiveFloat = 256.0  # tensors are sent in buckets of about this many MiB
    verify: Literal["checksum", "none"] = "checksum"  # re-read sampled tensors from every engine after a sync
    verify_tensors: PositiveInt = 4  # how many tensors "checksum" samples per sync
    flatten: bool = True  # one uint8 broadcast per bucket (load_format "flattened_bucket"); false: one per tensor
    # "distributed": broadcast over a weight-update process group (engines anywhere); "disk": safetensors files
    # in disk_dir, loaded with /update_weights_from_disk (engines on this host, or disk_dir on a shared filesystem)
    transport: Literal["distributed", "disk"] = "distributed"
    disk_dir: str = "/dev/shm"  # where "disk" writes its files (a tmpfs: the handoff stays in memory)
    # seconds an engine may take to finish its requests before the prefix-cache flush that follows a push (sync
    # runs; async runs do not flush)
    flush_wait: NonNegativeFloat = 60.0


class RouterConfig(Section):
    """sglang-router in front of the engines: /generate goes through it (its `policy` picks the engine);
    weight updates, health checks and restarts still go to each engine directly."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 30999
    launch: bool = True  # the trainer starts (and restarts) the router; false: use the one at host:port
    policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 30998  # its Prometheus exporter (always on)
    health_check_interval: PositiveInt = 5  # seconds between the router's checks of each engine


class RolloutConfig(Section):
    """The rollout fleet and how it samples.

    `async` overlaps generation of step k+1 with training of step k; samples generated more than
    `max_staleness` weight versions ago are dropped.
    """

    engines: Annotated[list[EngineSpec], Field(min_length=1)] = Field(default_factory=lambda: [EngineSpec()])
    n_samples_per_prompt: PositiveInt = 8
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    max_staleness: NonNegativeInt = 0
    async_mode: bool = Field(default=False, alias="async")
    token_env: str = "MEGATRON_RL_SERVE_TOKEN"  # environment variable with the engines' admin token
    max_concurrency: PositiveInt = 64  # /generate requests in flight per engine (one per prompt: its n samples)
    request_timeout: PositiveFloat = 600.0  # seconds for one generate request
    max_retries: NonNegativeInt = 3  # a failed request is retried on another engine this many times
    startup_timeout: PositiveFloat = 300.0  # seconds for a launched engine to answer /health_generate
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        first_at: dict[tuple[str, int], int] = {}
        for index, engine in enumerate(self.engines):
            address = (engine.host, engine.port)
            first = first_at.setdefault(address, index)
            problems.require(first == index, f"engines[{index}]",
                             f"has the same host:port as engines[{first}] ({engine.host}:{engine.port})")
            router = (self.router.host, self.router.port) if self.router.enabled else None
            problems.require(address != router, f"engines[{index}]",
                             f"has the host:port of rollout.router ({engine.host}:{engine.port})")
        problems.raise_if_any()
        return self


class DataConfig(Section):
    """The prompt set and how it is consumed.

    Each of `train_steps` steps takes `rollout_batch_size` prompts, generates
    rollout.n_samples_per_prompt responses for each, and trains on them in `num_mini_batches`
    optimizer steps (the staleness ratio N: mini-batch k is k-1 updates off-policy).
    """

    train_path: str | None = None  # a JSONL or Parquet file of prompts; needed to train, not to validate
    tokenizer_path: str | None = None  # a local tokenizer directory; null: model.hf_path
    prompt_key: str = "prompt"  # a string, sent as one user message
    messages_key: str = "messages"  # or a list of {role, content} messages
    answer_key: str = "answer"
    system_prompt: str | None = None  # prepended as a system message to prompt-string rows
    reward: str = "math"  # "math" (math-verify) or a function "package.module:function"
    reward_workers: PositiveInt = 1  # samples scored at once (threads; "math" checks each in a child process)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, generate more to refill
    dynamic_sampling_max_rounds: PositiveInt = 4  # generation rounds per step before training on fewer groups
    max_prompt_length: PositiveInt = 512
    max_response_length: PositiveInt = 1024
    rollout_batch_size: PositiveInt = 8
    num_mini_batches: PositiveInt = 1
    max_tokens_per_micro_batch: PositiveInt = 8192  # rows x padded length of one learner micro-batch
    pack_sequences: bool = False  # pack several samples into one row (THD, cu_seqlens) instead of padding; cp 1 only
    train_steps: PositiveInt = 100
    seed: NonNegativeInt = 42

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = ErrorCollector()
        problems.require(self.rollout_batch_size % self.num_mini_batches == 0, "num_mini_batches",
                         f"must divide rollout_batch_size = {self.rollout_batch_size}, "
                         f"got {self.num_mini_batches}")
        problems.raise_if_any()
        return self


class CheckpointConfig(Section):
    """Where and how often the full RL state is saved, and whether a run resumes from it."""

    dir: str = "runs/checkpoints"
    save_interval: NonNegativeInt = 50  # steps between saves; 0: never save
    keep_last: PositiveInt | None = 2  # null: keep every checkpoint
    resume: Literal[True, False, "auto"] = "auto"  # auto: resume if `dir` holds a checkpoint


class TrackingConfig(Section):
    """Where metrics go: wandb (online, offline or disabled) and an optional JSONL file."""

    dir: str = "runs"  # each run writes to dir/run_name (metrics, wandb files, server logs)
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    wandb_project: str = "megatron-rl"
    run_name: str | None = None  # null: a name made from the start time
    jsonl_path: str | None = None  # null: no JSONL metrics file

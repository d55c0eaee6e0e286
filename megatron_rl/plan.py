"""`megatron-rl plan`: where every learner rank and rollout engine runs, and what one learner GPU holds.

    cfg = load_config("configs/recipes/kpo_qwen3_4b.yaml", overrides)   # architecture from model.hf_path
    print(format_plan(cfg, gpus_per_node=8))

Nothing here starts a process or needs a GPU or the checkpoint's weights: the model comes from the
checkpoint's config.json, the rest is arithmetic.

Rank layout. Megatron-Core's initialize_model_parallel (order "tp-cp-ep-dp-pp") numbers the ranks as
mixed-radix numbers whose leftmost digit varies fastest, once for the dense layers and once for the
expert layers (the expert generator takes the same order with tp -> etp, cp -> 1, dp -> expert_dp):

    dense:   rank = tp_r  + tp  * (cp_r + cp * (dp_r  + dp  * pp_r))
    experts: rank = etp_r + etp * (ep_r + ep * (edp_r + edp * pp_r))

`rank_layout` inverts both; tests/unit/test_plan.py checks every rank against the real parallel_state
on gloo. The learner takes whole nodes: rank r runs on node r // gpus_per_node.

Rollout engines. Engines on a loopback host (127.0.0.1, localhost, ::1) run on node 0, where rank 0
launches them; every other host is one rollout node, numbered after the learner nodes in the order the
hosts first appear in rollout.engines. An SGLang engine takes `tp` GPUs of its node; a CPU engine none.

Memory of one learner GPU, per pipeline stage s (an estimate; B = bytes, fp32 throughout as in
learner/model.py and learner/optimizer.py). P_d and P_e are the dense and expert parameters the rank
holds (`stage_parameters`, exactly as build_gpt_model lays them out):

    weights      4 (P_d + P_e)
    gradients    4 (P_d + P_e)                          fp32 main-grad buffers (grad_reduce_in_fp32)
    Adam         8 (P_d / (dp cp) + P_e / expert_dp)    exp_avg + exp_avg_sq, distributed optimizer (ZeRO-1)
                 8 (P_d + P_e)                          without it
    activations  4 t (n_s a_layer + [s last] a_out)

t = data.max_tokens_per_micro_batch / cp is the tokens of one micro-batch on the rank; n_s is the number
of (layer, micro-batch) activation sets the pipeline schedule holds at once on stage s: L/pp for pp = 1,
(pp - s) L/pp under 1F1B, and (2 (pp - s - 1) + (vpp - 1) pp + 1) L/(pp vpp) under the interleaved
schedule (its warm-up forwards plus one). Per token, in elements, what the backward pass keeps of one
layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", recounted for RMSNorm, GQA,
SwiGLU and top-k MoE; fused attention that keeps no score matrix, no recomputation, no dropout):

    a_layer = 4 h / sp                        inputs of the two norms and of the linears they feed
            + ((2 a + 2 g) d + [qk_ln] (a + g) d) / tp    q, k, v, the attention output; q, k before their norms
            + mlp
    dense:    mlp = c f / tp                  fc1's output and fc2's input: c = 3 with SwiGLU (2f + f), else 2
    MoE:      mlp = E / sp + k / sp (2 h etp + c f_e) + [shared] c f_s / tp
                                              router logits; per routed copy (tokens spread evenly over the
                                              experts): fc1's input, the expert output, fc1's output, fc2's input
    a_out   = h + 2 V / tp                    the output layer's input, the logits and their gradient

with h hidden, a heads, g query groups, d head dim, f / f_e / f_s the dense / expert / shared-expert MLP
sizes, E experts, k = top-k, V vocabulary, and sp = tp with sequence parallelism, else 1. Not counted:
the CUDA context and allocator slack, communication buffers, the embedding's gather, and the a s^2
attention scores that the CPU path's unfused attention keeps.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_rl.config import ConfigError, ModelConfig, ParallelConfig, RunConfig

DEFAULT_GPUS_PER_NODE = 8
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RANK0_NODE = "(rank 0's node)"  # the host column of engines on a loopback host
WEIGHT_BYTES = GRADIENT_BYTES = ACTIVATION_BYTES = 4  # fp32
ADAM_BYTES = 8  # exp_avg and exp_avg_sq, fp32; fp32 weights need no separate main copy
GIB = 2**30


@dataclass(frozen=True)
class RankPlace:
    """One learner rank: its node and its coordinates in the dense and in the expert layout."""

    rank: int
    node: int
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    expert_dp: int


def mixed_radix(number: int, sizes: Iterable[int]) -> list[int]:
    """The digits of `number` in the mixed radix `sizes`, least significant (fastest varying) first."""
    digits = []
    for size in sizes:
        number, digit = divmod(number, size)
        digits.append(digit)
    return digits


def learner_nodes(parallel: ParallelConfig, gpus_per_node: int) -> int:
    """Nodes the learner occupies; ConfigError unless its ranks fill whole nodes (or fit in one)."""
    world = parallel.world_size
    if world > gpus_per_node and world % gpus_per_node:
        raise ConfigError([("parallel.world_size", f"{world} ranks do not fill whole nodes of {gpus_per_node} GPUs "
                                                   f"(--gpus-per-node): use a multiple of {gpus_per_node}")])
    return math.ceil(world / gpus_per_node)


def rank_layout(parallel: ParallelConfig, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> list[RankPlace]:
    """Every learner rank's node and Megatron-Core coordinates (see the module docstring)."""
    learner_nodes(parallel, gpus_per_node)
    dense = (parallel.tp, parallel.cp, parallel.dp, parallel.pp)
    expert = (parallel.etp, parallel.ep, parallel.expert_dp, parallel.pp)
    places = []
    for rank in range(parallel.world_size):
        tp, cp, dp, pp = mixed_radix(rank, dense)
        etp, ep, expert_dp, _ = mixed_radix(rank, expert)  # pp is the slowest digit of both
        places.append(RankPlace(rank, rank // gpus_per_node, tp, cp, dp, pp, etp, ep, expert_dp))
    return places


@dataclass(frozen=True)
class EngineNode:
    """A node that runs rollout engines: indices into rollout.engines and the GPUs they take."""

    node: int
    host: str
    engines: tuple[int, ...]
    gpus: int


def engine_nodes(cfg: RunConfig, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> list[EngineNode]:
    """The nodes of rollout.engines (see the module docstring); ConfigError when engines do not fit."""
    first_rollout_node = learner_nodes(cfg.parallel, gpus_per_node)
    by_host: dict[str, list[int]] = {}
    for index, engine in enumerate(cfg.rollout.engines):
        host = RANK0_NODE if engine.host in LOOPBACK_HOSTS else engine.host
        by_host.setdefault(host, []).append(index)
    nodes, problems = [], []
    rollout_node = first_rollout_node
    for host, indices in by_host.items():
        on_learner_node = host == RANK0_NODE
        node = 0 if on_learner_node else rollout_node
        rollout_node += not on_learner_node
        gpus = sum(cfg.rollout.engines[i].tp for i in indices if cfg.rollout.engines[i].kind == "sglang")
        taken = gpus + (min(cfg.parallel.world_size, gpus_per_node) if on_learner_node else 0)
        if taken > gpus_per_node:
            learners = f" beside the learner's {taken - gpus}" if on_learner_node else ""
            problems.append((f"rollout.engines[{indices[0]}]",
                             f"engines {_index_ranges(indices)} on {host} need {gpus} GPUs{learners}, more than the "
                             f"node's {gpus_per_node} (--gpus-per-node)"))
        nodes.append(EngineNode(node, host, tuple(indices), gpus))
    if problems:
        raise ConfigError(problems)
    return sorted(nodes, key=lambda entry: entry.node)


@dataclass(frozen=True)
class StageParameters:
    """Parameters one rank of a pipeline stage holds: dense (replicated over dp x cp) and expert."""

    dense: int
    expert: int


def stage_parameters(model: ModelConfig, parallel: ParallelConfig, stage: int) -> StageParameters:
    """Exactly the parameter elements build_gpt_model puts on one rank of pipeline stage `stage`.

    Per layer: two norms (RMSNorm: h weights; LayerNorm: h weights + h biases, replicated over tp),
    QKV [(a + 2g) d, h] and the output projection [h, a d] split over tp, q/k norms over d, then the
    dense MLP (fc1 [2f or f, h], fc2 [h, f], split over tp) or the MoE: router [E, h] (replicated),
    E / ep experts of fc1 + fc2 split over etp, a shared expert (split over tp) and its gate [1, h].
    Stage 0 holds the embedding [V / tp, h]; the last stage the final norm and the output layer
    [V / tp, h] (untied, or a copy of the tied embedding when pp > 1). Linear biases sit on the
    column-parallel outputs (split) and the row-parallel outputs (h, replicated).
    """
    h, tp, pp = model.hidden_size, parallel.tp, parallel.pp
    heads, groups = model.num_attention_heads, model.query_groups
    head_dim = model.kv_channels or h // heads
    norm_tensors = 2 if model.normalization == "LayerNorm" else 1  # weight (+ bias)
    qkv = (heads + 2 * groups) * head_dim
    attention = (h * qkv + heads * head_dim * h) // tp
    attention += qkv // tp * (model.add_qkv_bias or model.add_bias_linear) + h * model.add_bias_linear
    attention += 2 * norm_tensors * head_dim * model.qk_layernorm
    dense_layer, expert_layer = 2 * norm_tensors * h + attention, 0
    if model.num_experts is None:
        dense_layer += _mlp_parameters(model, model.ffn_hidden_size, tp)
    else:
        dense_layer += model.num_experts * h
        expert_size = model.moe_ffn_hidden_size or model.ffn_hidden_size
        expert_layer = model.num_experts // parallel.ep * _mlp_parameters(model, expert_size, parallel.etp)
        if model.moe_shared_expert_intermediate_size:
            dense_layer += _mlp_parameters(model, model.moe_shared_expert_intermediate_size, tp)
            dense_layer += h * model.moe_shared_expert_gate
    layers = model.num_layers // pp
    dense, vocabulary = layers * dense_layer, model.vocab_size * h // tp
    if stage == 0:
        dense += vocabulary
    if stage == pp - 1:
        dense += norm_tensors * h + vocabulary * (model.untie_embeddings_and_output_weights or pp > 1)
    return StageParameters(dense, layers * expert_layer)


def _mlp_parameters(model: ModelConfig, ffn: int, split: int) -> int:
    fc1 = 2 * ffn if model.swiglu else ffn
    return (model.hidden_size * (fc1 + ffn)) // split + (fc1 // split + model.hidden_size) * model.add_bias_linear


def model_parameters(model: ModelConfig) -> StageParameters:
    """The whole model's parameters (one rank, no parallelism): the checkpoint's size."""
    return stage_parameters(model, ParallelConfig(), stage=0)


@dataclass(frozen=True)
class StageMemory:
    """The memory estimate of one GPU of a pipeline stage, in bytes (formulas in the module docstring)."""

    stage: int
    parameters: StageParameters
    weights: int
    gradients: int
    adam_distributed: int
    adam_replicated: int
    activations: int
    tokens_per_micro_batch: int
    activation_layers: float  # the n_s of the module docstring
    distributed_optimizer: bool

    @property
    def adam(self) -> int:
        return self.adam_distributed if self.distributed_optimizer else self.adam_replicated

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adam + self.activations


def learner_memory(cfg: RunConfig) -> list[StageMemory]:
    """The memory estimate of one learner GPU of every pipeline stage."""
    model, parallel = cfg.model, cfg.parallel
    tokens = cfg.data.max_tokens_per_micro_batch // parallel.cp
    per_layer, output = activation_elements_per_token(model, parallel)
    stages = []
    for stage in range(parallel.pp):
        params = stage_parameters(model, parallel, stage)
        count = params.dense + params.expert
        layers = activation_layers(model, parallel, stage)
        elements = tokens * (layers * per_layer + (output if stage == parallel.pp - 1 else 0))
        stages.append(StageMemory(
            stage=stage, parameters=params, weights=WEIGHT_BYTES * count, gradients=GRADIENT_BYTES * count,
            adam_distributed=round(ADAM_BYTES * (params.dense / (parallel.dp * parallel.cp)
                                                 + params.expert / parallel.expert_dp)),
            adam_replicated=ADAM_BYTES * count, activations=round(ACTIVATION_BYTES * elements),
            tokens_per_micro_batch=tokens, activation_layers=layers,
            distributed_optimizer=cfg.optimizer.use_distributed_optimizer))
    return stages


def activation_layers(model: ModelConfig, parallel: ParallelConfig, stage: int) -> float:
    """n_s: (layer, micro-batch) activation sets held at once on pipeline stage `stage`."""
    pp, vpp = parallel.pp, parallel.vpp
    if pp == 1:
        return model.num_layers
    if vpp is None:
        return (pp - stage) * model.num_layers / pp
    chunks_in_flight = 2 * (pp - stage - 1) + (vpp - 1) * pp + 1
    return chunks_in_flight * model.num_layers / (pp * vpp)


def activation_elements_per_token(model: ModelConfig, parallel: ParallelConfig) -> tuple[float, float]:
    """(a_layer, a_out) of the module docstring: elements kept per token by one layer and by the output layer."""
    h, tp = model.hidden_size, parallel.tp
    sp = tp if parallel.sequence_parallel else 1
    heads, groups = model.num_attention_heads, model.query_groups
    head_dim = model.kv_channels or h // heads
    keep = 3 if model.swiglu else 2
    attention = ((2 * heads + 2 * groups) * head_dim + (heads + groups) * head_dim * model.qk_layernorm) / tp
    if model.num_experts is None:
        mlp = keep * model.ffn_hidden_size / tp
    else:
        expert_size = model.moe_ffn_hidden_size or model.ffn_hidden_size
        routed = model.moe_router_topk / sp * (2 * h * parallel.etp + keep * expert_size)
        shared = keep * (model.moe_shared_expert_intermediate_size or 0) / tp
        mlp = model.num_experts / sp + routed + shared
    return 4 * h / sp + attention + mlp, h + 2 * model.vocab_size / tp


def format_plan(cfg: RunConfig, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> str:
    """The text `megatron-rl plan` prints: rank layout, rollout nodes, memory per learner GPU."""
    places = rank_layout(cfg.parallel, gpus_per_node)
    engines = engine_nodes(cfg, gpus_per_node)
    lines = [*_layout_lines(cfg, places, gpus_per_node), "", *_rollout_lines(cfg, engines, places), "",
             *_memory_lines(cfg)]
    return "".join(f"{line.rstrip()}\n" for line in lines)


def _layout_lines(cfg: RunConfig, places: list[RankPlace], gpus_per_node: int) -> list[str]:
    p = cfg.parallel
    moe = cfg.model.num_experts is not None
    lines = [f"Learner: {p.world_size} GPUs on {_count(places[-1].node + 1, 'node')} of {gpus_per_node} GPUs",
             f"  dense layers:  tp {p.tp} x cp {p.cp} x dp {p.dp} x pp {p.pp}"
             + (f", vpp {p.vpp}" if p.vpp else "") + (", sequence parallel" if p.sequence_parallel else "")]
    if moe:
        lines.append(f"  expert layers: etp {p.etp} x ep {p.ep} x expert_dp {p.expert_dp} x pp {p.pp}")
    lines.append("  Megatron-Core's rank order tp-cp-ep-dp-pp, tp varying fastest"
                 + (" (expert layers: etp-ep-edp-pp)" if moe else "") + ":")
    expert_header = f" | {'etp':>3} {'ep':>3} {'edp':>4}" if moe else ""
    lines.append(f"  {'rank':>6} {'node':>5} | {'tp':>3} {'cp':>3} {'dp':>4} {'pp':>3}{expert_header}")
    for r in places:
        expert = f" | {r.etp:>3} {r.ep:>3} {r.expert_dp:>4}" if moe else ""
        lines.append(f"  {r.rank:>6} {r.node:>5} | {r.tp:>3} {r.cp:>3} {r.dp:>4} {r.pp:>3}{expert}")
    groups = [(p.tp, "tensor-parallel")] + ([(p.etp * p.ep, "expert-parallel (etp x ep)")] if moe else [])
    lines += [f"  note: {name} groups of {size} ranks span nodes" for size, name in groups
              if size > gpus_per_node or gpus_per_node % size]
    return lines


def _rollout_lines(cfg: RunConfig, engines: list[EngineNode], places: list[RankPlace]) -> list[str]:
    specs = cfg.rollout.engines
    gpus = sum(node.gpus for node in engines)
    lines = [f"Rollout: {_count(len(specs), 'engine')} on {_count(len(engines), 'node')}, {gpus} GPUs",
             f"  {'node':>5}  {'host':<20} {'GPUs':>4}  engines"]
    for node in engines:
        kinds: dict[tuple[str, int], list[int]] = {}
        for index in node.engines:
            kinds.setdefault((specs[index].kind, specs[index].tp), []).append(index)
        described = "; ".join(f"{_index_ranges(indices)}: {_count(len(indices), specs[indices[0]].kind + ' engine')} "
                              f"of tp {tp}, ports {_index_ranges(sorted(specs[i].port for i in indices))}"
                              for (_, tp), indices in kinds.items())
        lines.append(f"  {node.node:>5}  {node.host:<20} {node.gpus:>4}  {described}")
    nodes = {place.node for place in places} | {node.node for node in engines}
    lines.append(f"Total: {cfg.parallel.world_size + gpus} GPUs ({cfg.parallel.world_size} learner + {gpus} "
                 f"rollout) on {_count(len(nodes), 'node')}")
    return lines


def _memory_lines(cfg: RunConfig) -> list[str]:
    stages = learner_memory(cfg)
    full = model_parameters(cfg.model)
    adam = ("distributed over dp x cp" + (" (experts: expert_dp)" if full.expert else "")
            if cfg.optimizer.use_distributed_optimizer else "not distributed")
    lines = ["Learner memory per GPU (estimate, formulas in megatron_rl/plan.py):",
             f"  model: {_billions(full.dense)} dense" + (f" + {_billions(full.expert)} expert" if full.expert else "")
             + " parameters; fp32 weights, gradients and Adam states, Adam " + adam,
             f"  activations: {stages[0].tokens_per_micro_batch} tokens per micro-batch "
             "(data.max_tokens_per_micro_batch / cp), no recomputation",
             f"  {'stage':>5} {'params':>8} {'weights':>9} {'grads':>9} {'Adam':>9} {'Adam not':>9} "
             f"{'layer x':>7} {'activ.':>9} {'total':>9}",
             f"  {'':>5} {'':>8} {'':>9} {'':>9} {'dist.':>9} {'dist.':>9} {'micro-b':>7} {'':>9} {'':>9}"]
    for s in stages:
        lines.append(f"  {s.stage:>5} {_billions(s.parameters.dense + s.parameters.expert):>8} {_gib(s.weights):>9} "
                     f"{_gib(s.gradients):>9} {_gib(s.adam_distributed):>9} {_gib(s.adam_replicated):>9} "
                     f"{s.activation_layers:>7g} {_gib(s.activations):>9} {_gib(s.total):>9}")
    fullest = max(stages, key=lambda s: s.total)
    other, other_adam = (("without", fullest.adam_replicated) if cfg.optimizer.use_distributed_optimizer
                         else ("with", fullest.adam_distributed))
    lines.append(f"Fullest GPU: stage {fullest.stage}, {_gib(fullest.total)} "
                 f"({_gib(fullest.total - fullest.adam + other_adam)} {other} the distributed optimizer)")
    return lines


def _index_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f} B"


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"

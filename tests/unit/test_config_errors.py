"""Malformed configurations: each reports every problem under its exact dotted key."""

import pytest
import yaml

from megatron_rl.config import ConfigError, config_from_dict


def case(name: str, text: str, *errors: tuple[str, str]):
    """A malformed configuration (YAML text) and the exact errors it must raise, in order."""
    return pytest.param(text, list(errors), id=name)


MALFORMED = [
    # Unknown keys, at any depth, with the closest valid name or else the valid names.
    case("unknown-section", "modle: {}",
         ("modle", "unknown key; did you mean 'model'?")),
    case("unknown-parallel-key", "parallel: {tpp: 2}",
         ("parallel.tpp", "unknown key; did you mean 'tp'?")),
    case("unknown-hyperparam", "algorithm: {kpo: {qq: 1.0e-4}}",
         ("algorithm.kpo.qq", "unknown key; did you mean 'q'?")),
    case("unknown-in-null-correction", "algorithm: {corrections: {tis: {treshold: 3}}}",
         ("algorithm.corrections.tis.treshold", "unknown key; did you mean 'threshold'?")),
    case("unknown-in-list-item", "rollout: {engines: [{kind: cpu}, {port: 30001, hots: 10.0.0.2}]}",
         ("rollout.engines[1].hots", "unknown key; did you mean 'host'?")),
    case("unknown-near-alias", "rollout: {asynk: true}",
         ("rollout.asynk", "unknown key; did you mean 'async'?")),
    case("unknown-advantage-key", "algorithm: {advantage: {estimater: rloo}}",
         ("algorithm.advantage.estimater", "unknown key; did you mean 'estimator'?")),
    case("unknown-no-close-name", "data: {zzz: 1}",
         ("data.zzz", "unknown key; expected one of: train_path, tokenizer_path, prompt_key, messages_key, "
                      "answer_key, system_prompt, reward, reward_workers, dynamic_sampling, "
                      "dynamic_sampling_max_rounds, max_prompt_length, max_response_length, rollout_batch_size, "
                      "num_mini_batches, max_tokens_per_micro_batch, pack_sequences, train_steps, seed")),
    # Wrong types.
    case("int-from-word", "parallel: {tp: two}",
         ("parallel.tp", "expected a valid integer, got 'two'")),
    case("int-from-fraction", "parallel: {tp: 1.5}",
         ("parallel.tp", "expected a valid integer, got 1.5")),
    case("float-from-word", "algorithm: {kpo: {q: abc}}",
         ("algorithm.kpo.q", "expected a valid number, got 'abc'")),
    case("loss-name", "algorithm: {loss: kpoo}",
         ("algorithm.loss", "expected 'ppo', 'dapo', 'gspo', 'gspo_token', 'gmpo', 'cispo', 'sapo', 'kpo', "
                            "'vespo' or 'trm', got 'kpoo'")),
    case("normalization", "model: {normalization: BatchNorm}",
         ("model.normalization", "expected 'RMSNorm' or 'LayerNorm', got 'BatchNorm'")),
    case("bool-from-word", "parallel: {sequence_parallel: maybe}",
         ("parallel.sequence_parallel", "expected a valid boolean, got 'maybe'")),
    case("yaml-on-is-a-bool", "tracking: {wandb_mode: on}",
         ("tracking.wandb_mode", "expected 'online', 'offline' or 'disabled', got True")),
    case("resume", "checkpoint: {resume: sometimes}",
         ("checkpoint.resume", "expected True, False or 'auto', got 'sometimes'")),
    case("tis-level", "algorithm: {corrections: {tis: {level: word}}}",
         ("algorithm.corrections.tis.level", "expected 'token' or 'sequence', got 'word'")),
    case("tuple-too-short", "algorithm: {vespo: {pos: [2.0]}}",
         ("algorithm.vespo.pos[1]", "missing")),
    case("tuple-too-long", "algorithm: {vespo: {pos: [2.0, 3.0, 4.0]}}",
         ("algorithm.vespo.pos", "expected at most 2 items, got [2.0, 3.0, 4.0]")),
    case("no-engines", "rollout: {engines: []}",
         ("rollout.engines", "expected at least 1 item, got []")),
    case("section-not-mapping", "model: 5",
         ("model", "expected a valid dictionary or instance of ModelConfig, got 5")),
    case("hyperparams-not-mapping", "algorithm: {kpo: 3}",
         ("algorithm.kpo", "expected a dictionary or an instance of KPOConfig, got 3")),
    # Ranges of the schema's own fields.
    case("tp-zero", "parallel: {tp: 0}",
         ("parallel.tp", "expected > 0, got 0")),
    case("port-range", "rollout: {engines: [{port: 70000}]}",
         ("rollout.engines[0].port", "expected <= 65535, got 70000")),
    case("adam-beta", "optimizer: {adam_beta2: 1.0}",
         ("optimizer.adam_beta2", "expected < 1.0, got 1.0")),
    case("staleness", "rollout: {max_staleness: -1}",
         ("rollout.max_staleness", "expected >= 0, got -1")),
    # Ranges checked by the hyperparams dataclasses' __post_init__.
    case("cispo-eps", "algorithm: {cispo: {eps_high: -5}}",
         ("algorithm.cispo.eps_high", "must be > 0, got -5.0")),
    case("gmpo-token-tis", "algorithm: {loss: gmpo, corrections: {tis: {level: token}}}",
         ("algorithm.corrections.tis", "weights tokens, but loss 'gmpo' is sequence-level: set level: sequence")),
    case("gspo-icepop", "algorithm: {loss: gspo, corrections: {icepop: {}}}",
         ("algorithm.corrections.icepop",
          "weights tokens, but loss 'gspo' is sequence-level: use a token-level loss or remove it")),
    case("kpo-q", "algorithm: {kpo: {q: -1}}",
         ("algorithm.kpo.q", "must be > 0, got -1.0")),
    case("vespo-c1", "algorithm: {vespo: {neg: [0.5, 2.0]}}",
         ("algorithm.vespo.neg[0]", "must be >= 1 (c1: the variance bound needs c1 >= 1), got 0.5")),
    case("icepop-band", "algorithm: {corrections: {icepop: {low: 2.0, high: 1.0}}}",
         ("algorithm.corrections.icepop.high", "must be > low (2.0), got 1.0")),
    case("trm-no-criterion", "algorithm: {trm: {max_k2: null}}",
         ("algorithm.trm.max_k2", "must be set when avg_k3 is null (TRM needs at least one criterion), got None")),
    case("max-log-ratio", "algorithm: {max_log_ratio: 0}",
         ("algorithm.max_log_ratio", "must be > 0, got 0.0")),
    case("dual-clip", "algorithm: {ppo: {dual_clip_c: 1.0}}",
         ("algorithm.ppo.dual_clip_c", "must be > 1 or null, got 1.0")),
    case("advantage-eps", "algorithm: {advantage: {eps: 0}}",
         ("algorithm.advantage.eps", "must be > 0, got 0.0")),
    *(case(f"agg-mode-with-{loss}", f"algorithm: {{loss: {loss}, loss_agg_mode: token-mean}}",
           ("algorithm.loss_agg_mode", f"must be null for loss '{loss}', whose aggregation is fixed, "
                                       "got 'token-mean'"))
      for loss in ("gspo", "gspo_token", "gmpo", "trm")),
    # Rules within one section.
    case("world-vs-tp", "parallel: {tp: 2, world_size: 3}",
         ("parallel.world_size", "must be a multiple of tp * pp * cp = 2, got 3")),
    case("expert-layout", "parallel: {world_size: 4, ep: 2, etp: 4}",
         ("parallel.ep", "ep * etp * pp = 8 must divide world_size = 4")),
    case("vpp-without-pp", "parallel: {vpp: 2}",
         ("parallel.vpp", "must be null unless pp > 1, got 2")),
    case("sp-without-tp", "parallel: {sequence_parallel: true}",
         ("parallel.sequence_parallel", "must be false unless tp > 1")),
    case("moe-tp-needs-sp", "{model: {num_experts: 4}, parallel: {tp: 2, ep: 2, world_size: 4}}",
         ("parallel.sequence_parallel",
          "must be true when ep > 1 and tp > 1 (Megatron-Core's MoE layers need it)")),
    case("heads-vs-groups", "model: {num_attention_heads: 4, num_query_groups: 3}",
         ("model.num_query_groups", "must divide num_attention_heads = 4, got 3")),
    case("hidden-vs-heads", "model: {hidden_size: 66, num_attention_heads: 4}",
         ("model.hidden_size",
          "must be a multiple of num_attention_heads = 4 when kv_channels is null, got 66")),
    case("topk-vs-experts", "model: {num_experts: 4, moe_router_topk: 8}",
         ("model.moe_router_topk", "must be <= num_experts = 4, got 8")),
    case("min-lr", "optimizer: {lr: 1.0e-6, min_lr: 1.0e-5}",
         ("optimizer.min_lr", "must be <= lr = 1e-06, got 1e-05")),
    case("cpu-engine-tp", "rollout: {engines: [{kind: cpu, tp: 2}]}",
         ("rollout.engines[0].tp", "must be 1 for kind 'cpu', got 2")),
    case("same-engine-twice", "rollout: {engines: [{port: 30000}, {port: 30000}]}",
         ("rollout.engines[1]", "has the same host:port as engines[0] (127.0.0.1:30000)")),
    case("top-k-zero", "rollout: {sampling: {top_k: 0}}",
         ("rollout.sampling.top_k", "must be -1 (off) or >= 1, got 0")),
    case("mini-batches", "data: {rollout_batch_size: 8, num_mini_batches: 3}",
         ("data.num_mini_batches", "must divide rollout_batch_size = 8, got 3")),
    # Rules across sections.
    case("heads-vs-tp", "{model: {num_attention_heads: 6, hidden_size: 48},"
                        " parallel: {tp: 4, world_size: 4}}",
         ("parallel.tp", "must divide model.num_attention_heads = 6, got 4")),
    case("groups-vs-tp", "{model: {num_attention_heads: 12, num_query_groups: 6, hidden_size: 48},"
                         " parallel: {tp: 4, world_size: 4}}",
         ("parallel.tp", "must be a multiple or a divisor of model.num_query_groups = 6, got 4")),
    case("ep-on-dense", "parallel: {ep: 2, world_size: 2}",
         ("parallel.ep", "must be 1 for a dense model (model.num_experts is null), got 2")),
    case("experts-vs-ep", "{model: {num_experts: 6}, parallel: {ep: 4, world_size: 4}}",
         ("parallel.ep", "must divide model.num_experts = 6, got 4")),
    case("layers-vs-pp", "{model: {num_layers: 3}, parallel: {pp: 2, world_size: 2}}",
         ("parallel.pp", "must divide model.num_layers = 3, got 2")),
    case("layers-vs-vpp", "{model: {num_layers: 4}, parallel: {pp: 2, vpp: 4, world_size: 2}}",
         ("parallel.vpp", "pp * vpp = 8 must divide model.num_layers = 4")),
    case("sequence-too-long", "{model: {max_position_embeddings: 1000},"
                              " data: {max_prompt_length: 512, max_response_length: 1024}}",
         ("model.max_position_embeddings",
          "must be >= data.max_prompt_length + data.max_response_length = 1536, got 1000")),
    case("async-needs-staleness", "rollout: {async: true}",
         ("rollout.max_staleness", "must be >= 1 when rollout.async is true (a batch generated while the learner "
                                   "trains is one weight version behind), got 0")),
    case("new-tokens-vs-response", "{rollout: {sampling: {max_new_tokens: 2048}},"
                                   " data: {max_response_length: 1024}}",
         ("rollout.sampling.max_new_tokens", "must be <= data.max_response_length = 1024, got 2048")),
    case("warmup-vs-steps", "{optimizer: {lr_warmup_steps: 401}, data: {train_steps: 100, num_mini_batches: 4}}",
         ("optimizer.lr_warmup_steps", "must be <= the run's optimizer steps, data.train_steps x "
                                       "data.num_mini_batches = 400, got 401")),
    case("batch-vs-dp", "{parallel: {world_size: 3}, data: {rollout_batch_size: 2, num_mini_batches: 1},"
                        " rollout: {n_samples_per_prompt: 4}}",
         ("data.rollout_batch_size", "rollout_batch_size * rollout.n_samples_per_prompt / num_mini_batches "
                                     "= 8 samples per optimizer step must be divisible by parallel.dp = 3")),
    case("top-level-list", "[model, parallel]",
         ("(top level)", "expected a mapping of sections, got list")),
]


def errors_of(raw: object, overrides: list[str] = ()) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, overrides)
    return caught.value.errors


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_config_names_the_key(text, expected):
    assert errors_of(yaml.safe_load(text)) == expected


def test_every_error_is_reported_at_once():
    raw = yaml.safe_load("""
        parallel: {tp: 0, vpp: 2}
        algorithm: {kpo: {qq: 1, q: -1}, vespo: {pos: [0.5, 3.0]}}
        rollout: {sampling: {top_p: 2}}
        tracking: {wandb_mod: online}
    """)
    assert errors_of(raw, ["data.seed=x", "no_equals_sign"]) == [
        ("no_equals_sign", "expected an override of the form dotted.key=value"),
        ("algorithm.kpo.qq", "unknown key; did you mean 'q'?"),
        ("tracking.wandb_mod", "unknown key; did you mean 'wandb_mode'?"),
        ("parallel.tp", "expected > 0, got 0"),
        ("rollout.sampling.top_p", "expected <= 1.0, got 2"),
        ("algorithm.kpo.q", "must be > 0, got -1.0"),
        ("algorithm.vespo.pos[0]", "must be >= 1 (c1: the variance bound needs c1 >= 1), got 0.5"),
        ("data.seed", "expected a valid integer, got 'x'"),
    ]


def test_rules_of_valid_sections_run_beside_errors_in_other_sections():
    raw = yaml.safe_load("""
        parallel: {vpp: 2}
        data: {seed: -1}
        model: {num_attention_heads: 4, num_query_groups: 3}
    """)
    assert errors_of(raw) == [
        ("model.num_query_groups", "must divide num_attention_heads = 4, got 3"),
        ("parallel.vpp", "must be null unless pp > 1, got 2"),
        ("data.seed", "expected >= 0, got -1"),
    ]


def test_config_error_lists_one_error_per_line():
    errors = [("parallel.tp", "expected > 0, got 0"), ("algorithm.kpo.q", "must be > 0, got -1.0")]
    error = ConfigError(errors)
    assert str(error) == "parallel.tp: expected > 0, got 0\nalgorithm.kpo.q: must be > 0, got -1.0"
    assert error.errors == errors

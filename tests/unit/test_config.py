"""Valid configurations: defaults, the example file, derived sizes, and the YAML round trip."""

import dataclasses
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from megatron_rl.algorithms.hyperparams import (
    DEFAULT_AGGREGATION,
    FIXED_AGGREGATION,
    AdvantageConfig,
    KPOConfig,
    LossName,
    PolicyLossConfig,
    TruncatedISConfig,
    VESPOConfig,
)
from megatron_rl.config import RunConfig, config_from_dict, dump_config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"

# Overrides that change every section (test_non_default_case_changes_every_section checks it).
NON_DEFAULT_OVERRIDES = [
    "model.num_layers=4", "model.num_experts=8", "model.moe_router_topk=2", "model.kv_channels=32",
    "model.moe_router_score_function=sigmoid",
    "parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "parallel.ep=2", "parallel.sequence_parallel=true",
    "parallel.world_size=8", "optimizer.lr_decay_style=linear", "optimizer.adam_eps=1e-6",
    "rollout.engines=[{kind: sglang, tp: 2, host: node1, port: 31000}, {kind: sglang, tp: 2, host: node2}]",
    "rollout.async=true", "rollout.max_staleness=2", "rollout.sampling.top_k=50",
    "algorithm.loss=vespo", "algorithm.vespo.pos=[2.5, 3.5]", "algorithm.loss_norm_const=4096",
    "algorithm.loss_agg_mode=seq-mean-token-sum-norm", "algorithm.corrections.mis.level=sequence",
    "algorithm.corrections.icepop.high=4", "algorithm.corrections.trm.avg_k3=0.001",
    "algorithm.advantage.estimator=rloo", "data.seed=7", "checkpoint.resume=false",
    "checkpoint.keep_last=null",
    "tracking.wandb_mode=offline", "tracking.run_name=kpo-tiny",
]
ROUND_TRIP_CASES = {
    "defaults": ({}, []),
    "example": (yaml.safe_load(EXAMPLE.read_text()), []),
    "non-default": ({}, NON_DEFAULT_OVERRIDES),
}


def restricted(full: object, shape: object) -> object:
    """`full` with only the keys `shape` has, at every depth (lists element by element)."""
    if isinstance(shape, dict):
        return {name: restricted(full[name], value) for name, value in shape.items()}
    if isinstance(shape, list) and isinstance(full, list) and len(full) == len(shape):
        return [restricted(full_item, item) for full_item, item in zip(full, shape, strict=True)]
    return full


def test_empty_config_is_the_defaults():
    assert config_from_dict({}) == RunConfig()
    assert dump_config(config_from_dict({})) == dump_config(RunConfig())


def test_example_config_validates_and_keeps_every_value_it_writes():
    config = load_config(EXAMPLE)
    written = yaml.safe_load(EXAMPLE.read_text())
    assert restricted(yaml.safe_load(dump_config(config)), written) == written
    assert (config.parallel.world_size, config.parallel.dp, config.rollout.engines[0].kind) == (2, 2, "cpu")


@pytest.mark.parametrize(("raw", "overrides"), list(ROUND_TRIP_CASES.values()), ids=list(ROUND_TRIP_CASES))
def test_fully_specified_yaml_loads_and_dumps_back_unchanged(raw, overrides):
    dumped = dump_config(config_from_dict(raw, overrides))  # every key written
    reloaded = config_from_dict(yaml.safe_load(dumped))
    assert reloaded == config_from_dict(raw, overrides)
    assert dump_config(reloaded) == dumped


def test_non_default_case_changes_every_section():
    changed = yaml.safe_load(dump_config(config_from_dict({}, NON_DEFAULT_OVERRIDES)))
    default = yaml.safe_load(dump_config(RunConfig()))
    assert [section for section in default if changed[section] == default[section]] == []


def test_vespo_tuples_dump_as_yaml_lists_and_load_back_as_tuples():
    config = config_from_dict({"algorithm": {"vespo": {"pos": [2.5, 3.5]}}})
    assert config.algorithm.vespo.pos == (2.5, 3.5)
    assert yaml.safe_load(dump_config(config))["algorithm"]["vespo"]["pos"] == [2.5, 3.5]
    assert "pos:\n    - 2.5\n    - 3.5\n" in dump_config(config)
    reloaded = config_from_dict(yaml.safe_load(dump_config(config)))
    assert reloaded.algorithm.vespo == VESPOConfig(pos=(2.5, 3.5))


def test_algorithm_is_a_policy_loss_config_with_the_hyperparams_defaults():
    algorithm = RunConfig().algorithm
    assert isinstance(algorithm, PolicyLossConfig)
    for field in dataclasses.fields(PolicyLossConfig):
        assert getattr(algorithm, field.name) == getattr(PolicyLossConfig(), field.name), field.name
    assert algorithm.advantage == AdvantageConfig()
    assert (type(algorithm.kpo), type(algorithm.advantage)) == (KPOConfig, AdvantageConfig)


def test_loss_names_agree_with_the_policy_loss_registry():
    from megatron_rl.algorithms.policy_loss import POLICY_LOSSES  # imports torch: only this test needs it

    assert set(typing.get_args(LossName)) == set(POLICY_LOSSES) == set(DEFAULT_AGGREGATION)
    assert {name for name, mode in DEFAULT_AGGREGATION.items() if mode is None} <= FIXED_AGGREGATION


def test_algorithm_values_reach_the_hyperparams_dataclasses():
    config = config_from_dict({"algorithm": {"loss": "ppo", "loss_agg_mode": "seq-mean-token-mean",
                                             "kpo": {"q": 1e-4, "clip": False},
                                             "corrections": {"tis": {"level": "sequence", "threshold": 5}}}})
    assert config.algorithm.loss == "ppo"
    assert config.algorithm.loss_agg_mode == "seq-mean-token-mean"
    assert config.algorithm.kpo == KPOConfig(q=1e-4, clip=False)
    assert config.algorithm.corrections.tis == TruncatedISConfig(level="sequence", threshold=5.0)


def test_pyyaml_string_1e_4_in_a_file_becomes_a_float():
    raw = yaml.safe_load("algorithm:\n  kpo:\n    q: 1e-4\n")
    assert raw["algorithm"]["kpo"]["q"] == "1e-4"  # PyYAML reads a float without a dot as a string
    assert config_from_dict(raw).algorithm.kpo.q == 1e-4


@pytest.mark.parametrize(("parallel", "dp", "expert_dp"), [
    ({"world_size": 8}, 8, 8),
    ({"world_size": 16, "tp": 2, "pp": 2, "cp": 2}, 2, 8),
    ({"world_size": 16, "tp": 2, "pp": 2, "ep": 4, "sequence_parallel": True}, 4, 2),
    ({"world_size": 32, "tp": 4, "etp": 1, "ep": 8, "sequence_parallel": True}, 8, 4),
])
def test_derived_data_parallel_sizes(parallel, dp, expert_dp):
    config = config_from_dict({"model": {"num_experts": 8}, "parallel": parallel})
    assert (config.parallel.dp, config.parallel.expert_dp) == (dp, expert_dp)


def test_query_groups_default_to_the_attention_heads():
    assert config_from_dict({"model": {"num_attention_heads": 8}}).model.query_groups == 8
    grouped = config_from_dict({"model": {"num_attention_heads": 8, "num_query_groups": 2}})
    assert grouped.model.query_groups == 2


def test_tp_may_be_a_multiple_of_the_query_groups():
    config = config_from_dict({"model": {"num_attention_heads": 8, "num_query_groups": 2},
                               "parallel": {"tp": 8, "world_size": 8, "sequence_parallel": True}})
    assert (config.parallel.tp, config.model.num_query_groups) == (8, 2)


def test_config_is_immutable():
    config = RunConfig()
    with pytest.raises(pydantic.ValidationError):
        config.parallel.tp = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.algorithm.kpo.q = 1.0

"""Dotted command-line overrides: values read as YAML, sections created on the way."""

import pytest

from megatron_rl.algorithms.hyperparams import TruncatedISConfig
from megatron_rl.config import ConfigError, config_from_dict

WITH_TIS = {"algorithm": {"corrections": {"tis": {"level": "sequence", "threshold": 4.0}}}}


def test_exponent_without_a_dot_becomes_a_float():
    assert config_from_dict({}, ["algorithm.kpo.q=1e-4"]).algorithm.kpo.q == 1e-4
    assert config_from_dict({}, ["optimizer.lr=3E-7"]).optimizer.lr == 3e-7


def test_integers_and_strings():
    config = config_from_dict({}, ["parallel.tp=2", "parallel.world_size=4", "tracking.run_name=kpo-q1e-4"])
    assert (config.parallel.tp, config.parallel.dp, config.tracking.run_name) == (2, 2, "kpo-q1e-4")


@pytest.mark.parametrize(("value", "expected"),
                         [("true", True), ("false", False), ("True", True), ("off", False)])
def test_booleans(value, expected):
    assert config_from_dict({}, [f"rollout.async={value}", "rollout.max_staleness=1"]).rollout.async_mode is expected


def test_null_switches_a_correction_off():
    assert config_from_dict(WITH_TIS).algorithm.corrections.tis == TruncatedISConfig("sequence", 4.0)
    assert config_from_dict(WITH_TIS, ["algorithm.corrections.tis=null"]).algorithm.corrections.tis is None


def test_lists_become_tuples():
    assert config_from_dict({}, ["algorithm.vespo.pos=[2.5,3.5]"]).algorithm.vespo.pos == (2.5, 3.5)


def test_flow_mappings_set_lists_of_sections():
    engines = "rollout.engines=[{kind: sglang, port: 31000}, {kind: sglang, port: 31001}]"
    config = config_from_dict({}, [engines])
    assert [(engine.kind, engine.port) for engine in config.rollout.engines] == [
        ("sglang", 31000), ("sglang", 31001)]


def test_key_inside_a_null_section_creates_it_with_defaults():
    raw = {"algorithm": {"corrections": {"tis": None}}}
    tis = config_from_dict(raw, ["algorithm.corrections.tis.threshold=3"]).algorithm.corrections.tis
    assert tis == TruncatedISConfig(threshold=3.0)


def test_key_inside_an_absent_section_creates_it():
    config = config_from_dict({}, ["algorithm.corrections.tis.level=sequence"])
    assert config.algorithm.corrections.tis == TruncatedISConfig(level="sequence")


def test_overrides_replace_file_values_and_the_last_one_wins():
    overrides = ["algorithm.corrections.tis.threshold=6", "parallel.tp=2", "parallel.tp=1"]
    config = config_from_dict(WITH_TIS, overrides)
    assert config.algorithm.corrections.tis == TruncatedISConfig("sequence", 6.0)
    assert config.parallel.tp == 1


def test_overrides_leave_the_input_untouched():
    raw = {"algorithm": {"corrections": {"tis": {"threshold": 4.0}}}}
    config_from_dict(raw, ["algorithm.corrections.tis.threshold=6", "algorithm.kpo.q=1e-5"])
    assert raw == {"algorithm": {"corrections": {"tis": {"threshold": 4.0}}}}


@pytest.mark.parametrize(("override", "expected"), [
    ("parallel.tp", ("parallel.tp", "expected an override of the form dotted.key=value")),
    ("parallel..tp=2", ("parallel..tp=2", "expected an override of the form dotted.key=value")),
    ("=2", ("=2", "expected an override of the form dotted.key=value")),
    ("algorithm.vespo.pos=[2.0,", ("algorithm.vespo.pos", "the value '[2.0,' is not valid YAML (expected "
                                   "the node content, but found '<stream end>' at line 1, column 6)")),
    ("parallel.tp.size=2", ("parallel.tp", "is 1, not a section, so 'size' cannot be set in it")),
    ("algorithm.kpo.qq=1", ("algorithm.kpo.qq", "unknown key; did you mean 'q'?")),
    ("algorithm.corrections.tis.threshold=-1",
     ("algorithm.corrections.tis.threshold", "must be > 0, got -1.0")),
])
def test_malformed_override(override, expected):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"parallel": {"tp": 1}}, [override])
    assert caught.value.errors == [expected]

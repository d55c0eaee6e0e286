"""math_reward through real math-verify (in its child processes), plug-in loading, RewardComputer's error counts."""

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from megatron_rl.data.rewards import (
    MathVerifier,
    MathVerifierError,
    RewardComputer,
    final_answer_text,
    load_reward_fn,
    math_reward,
)

# (response, reference answer, reward): the cases measured in research/rollout_cpu.md section 4, then ours
MATH_CASES = [
    ("\\boxed{72}", "72", 1.0),
    ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("#### 18", "18", 1.0),
    ("x = 3", "4", 0.0),
    ("$\\sqrt{2}/2$", "\\frac{\\sqrt{2}}{2}", 1.0),  # the bare LaTeX reference only parses as "$...$"
    ("So 12 * 6 = 72.", "72", 1.0),  # the last number
    ("First 3, then \\boxed{5}, then 7", "5", 1.0),  # the last \boxed wins over a later number
    ("First 3, then \\boxed{5}, then 7", "7", 0.0),
    ("We get 18.\n#### 18\nQuestion: what is 4 + 3? 7", "18", 1.0),  # "####" wins over a later number
    ("We get 18.\n#### 18\nQuestion: what is 4 + 3? 7", "7", 0.0),
    ("I think 18 and then 7", "7", 1.0),  # without "####" the last number is the answer
    ("Natalia sold 24 in May, 72 in total.\n#### 72", "She sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("", "72", 0.0),  # garbage
    ("!!! ??? \\frac{ }} $$ ####", "72", 0.0),
    ("assistant assistant assistant", "72", 0.0),
    ("\\boxed{9^{9^{9}}}", "72", 0.0),  # sympy would work for minutes: math-verify's alarm stops it
]


@pytest.mark.parametrize(("response", "answer", "reward"), MATH_CASES)
def test_math_reward(response, answer, reward):
    assert math_reward("prompt", response, answer, {}) == reward


def test_final_answer_text():
    assert final_answer_text("a \\boxed{1} #### 2") == "a \\boxed{1} #### 2"
    assert final_answer_text("a #### 1\n#### 2 \nmore 3") == " 2 "
    assert final_answer_text("no marker 3") == "no marker 3"


def test_math_reward_from_threads():
    """math-verify's own alarms raise outside the main thread; math_reward runs it in its processes."""
    from math_verify import parse

    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="signal.alarm"):
        pool.submit(parse, "\\boxed{1}").result()  # the negative control: math-verify called in a thread
    with ThreadPoolExecutor(3) as pool:
        rewards = list(pool.map(lambda case: math_reward("", case[0], case[1], {}), MATH_CASES[:8] * 2))
    assert rewards == [reward for _, _, reward in MATH_CASES[:8]] * 2


def test_math_reward_needs_a_parsable_reference():
    with pytest.raises(ValueError, match="math_reward needs a reference answer"):
        math_reward("", "\\boxed{1}", None, {})
    with pytest.raises(MathVerifierError, match="ValueError: math-verify cannot parse the reference answer ''"):
        math_reward("", "\\boxed{1}", "", {})


def test_verifier_deadline_kills_and_replaces_its_process():
    verifier = MathVerifier(timeout=5, deadline=1.0)  # a deadline below math-verify's alarm
    assert verifier("\\boxed{3}", "3") is True
    first = verifier._idle[0].process
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="longer than 1.0 s on a text of 17 characters"):
        verifier("\\boxed{9^{9^{9}}}", "72")
    assert time.monotonic() - start < 3.0
    assert first.wait(timeout=5) == -9 and verifier._idle == []
    assert verifier("\\boxed{3}", "4") is False  # a fresh process
    verifier._idle[0].process.kill()
    with pytest.raises(MathVerifierError, match="exited with code -9"):
        verifier("1", "1")
    assert verifier("1", "1") is True
    verifier.close()
    assert verifier._idle == []


PLUGIN = '''
import math

def length_reward(prompt, response, answer, metadata):
    return float(len(response))

class Scorer:
    @staticmethod
    def score(prompt, response, answer, metadata):
        return 2.0

NOT_A_FUNCTION = 3

def two_arguments(prompt, response):
    return 0.0
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "reward_plugin_for_tests.py").write_text(PLUGIN)
    (tmp_path / "reward_plugin_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("reward_plugin_for_tests", "reward_plugin_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield "reward_plugin_for_tests"
    for name in ("reward_plugin_for_tests", "reward_plugin_broken"):
        sys.modules.pop(name, None)


def test_load_reward_fn(plugin_module):
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn(f"{plugin_module}:length_reward")("", "abcd", None, {}) == 4.0
    assert load_reward_fn(f"{plugin_module}.length_reward")("", "abc", None, {}) == 3.0
    assert load_reward_fn(f"{plugin_module}:Scorer.score")("", "", None, {}) == 2.0
    assert load_reward_fn("megatron_rl.data.rewards:math_reward") is math_reward


@pytest.mark.parametrize(("spec", "message"), [
    ("mathh", "expected 'math' or a function as 'package.module:function'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz': ModuleNotFoundError: No module named"),
    ("reward_plugin_broken:f", "cannot import 'reward_plugin_broken': RuntimeError: broken at import"),
    ("reward_plugin_for_tests:missing", "module 'reward_plugin_for_tests' has no attribute 'missing'"),
    ("reward_plugin_for_tests:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    ("reward_plugin_for_tests:two_arguments", r"must accept \(prompt, response, answer, metadata\)"),
])
def test_load_reward_fn_errors_name_the_spec(plugin_module, spec, message):
    with pytest.raises(ValueError, match=f"reward '{spec}': {message}"):
        load_reward_fn(spec)


def flaky_reward(prompt, response, answer, metadata):
    outcomes = {"one": 1, "half": np.float32(0.5), "yes": True, "nan": float("nan"), "inf": -float("inf"),
                "text": "1.0", "none": None}
    if response == "divide":
        return 1 / 0
    if response == "key":
        return metadata["missing"]
    return outcomes[response]


BATCH = ["one", "divide", "nan", "half", "text", "divide", "inf", "yes", "none", "key"]


@pytest.mark.parametrize("num_workers", [1, 3])
def test_reward_computer_counts_errors_as_zero(num_workers, caplog):
    computer = RewardComputer(flaky_reward, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="megatron_rl.data.rewards"):
        rewards, errors = computer([("p", response, None, {}) for response in BATCH])
        again, _ = computer([("p", "divide", None, {})])
    assert rewards == [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert all(type(reward) is float for reward in rewards) and again == [0.0]
    assert errors == {"ZeroDivisionError": 2, "NonFiniteReward": 2, "NonNumericReward": 2, "KeyError": 1}
    assert computer.first_messages["ZeroDivisionError"] == "division by zero"
    assert computer.first_messages["KeyError"] == "'missing'"
    assert computer.first_messages["NonNumericReward"] in ("the reward function returned str '1.0'",
                                                           "the reward function returned NoneType None")
    assert len(caplog.records) == 4  # once per kind, not per sample


def test_reward_computer_with_math_reward_in_threads():
    items = [("", response, answer, {}) for response, answer, _ in MATH_CASES[:6]] + [("", "1", None, {})]
    rewards, errors = RewardComputer(math_reward, num_workers=2)(items)
    assert rewards == [reward for _, _, reward in MATH_CASES[:6]] + [0.0]
    assert errors == {"ValueError": 1}


def test_reward_computer_rejects_zero_workers():
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        RewardComputer(math_reward, num_workers=0)

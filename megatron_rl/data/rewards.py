r"""Rewards: math answers checked with math-verify, plug-in reward functions, and batch scoring that never
stops the run.

A reward function maps (prompt_text, response_text, answer, metadata) to a float:

    fn = load_reward_fn("math")                        # or "my_package.my_module:my_reward"
    rewards, errors = RewardComputer(fn, num_workers=4)(items)   # errors: {"ValueError": 2, ...}

`math_reward` is 1.0 if the response's final answer equals the reference answer by math-verify, else
0.0. The final answer of a text (`final_answer_text`, applied to both the response and the reference):

    1. if it holds a \boxed{...}: the text itself; math-verify takes the last \boxed{...} first,
    2. else if it holds "####" (GSM8K): the rest of the line after the last "####",
    3. else the text itself; math-verify takes an "final answer is ..." or "answer: ..." phrase first,
       else the rightmost LaTeX expression, plain expression or number.

The reference is parsed as LaTeX math, "$reference$" (a bare "\frac{\sqrt{2}}{2}" only parses that
way), unless it holds "$" or \boxed already, then as it is; a reference neither parses raises.

math-verify bounds its sympy work with signal.alarm, which only works in a process's main thread;
without a bound, "\boxed{9^{9^{9}}}" keeps sympy busy for minutes. So `MathVerifier` runs math-verify
in child processes (`python -m megatron_rl.data.rewards`, started on first use, one per concurrent
caller, reused), each in its main thread with its alarms at `timeout` seconds per parse and per
comparison (a timed-out comparison is a mismatch). A check that still takes longer than `deadline`
seconds (work an alarm cannot interrupt) kills its process and raises TimeoutError. math_reward is
therefore safe to call from any thread. Wire format, one JSON object per line:
{"ready": true} once started, then per request {"text": str, "answer": str} a reply {"match": bool}
or {"error": "ExceptionType: message"}.
"""

import functools
import importlib
import inspect
import json
import logging
import math
import numbers
import os
import select
import subprocess
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RewardFn = Callable[[str, str, str | None, dict], float]

MATH_VERIFY_TIMEOUT = 2  # seconds, math-verify's own alarm per parse and per comparison (whole seconds)
CHECK_DEADLINE = 30.0  # seconds per check; then the process is killed
START_DEADLINE = 120.0  # seconds for a new process to import math-verify and say {"ready": true}
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding megatron_rl/

logger = logging.getLogger(__name__)


def final_answer_text(text: str) -> str:
    """The part of `text` that holds its final answer (rules 1-3 of the module docstring)."""
    if "\\boxed" in text:
        return text
    marker = text.rfind("####")
    if marker >= 0:
        return text[marker + len("####"):].split("\n", 1)[0]
    return text


class MathVerifierError(RuntimeError):
    """math-verify raised inside its process (the message names the exception), or the process failed."""


class _VerifierProcess:
    """One child process running `_serve`; `ask` sends a request and waits at most `deadline` seconds."""

    def __init__(self, timeout: int):
        pythonpath = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "megatron_rl.data.rewards", str(timeout)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=dict(os.environ, PYTHONPATH=pythonpath))
        try:
            self._reply(START_DEADLINE, "to start")
        except BaseException:
            self.close(kill=True)
            raise

    def ask(self, request: dict, deadline: float) -> dict:
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as error:
            raise self._exited() from error
        return self._reply(deadline, f"on a text of {len(request['text'])} characters")

    def _reply(self, deadline: float, what: str) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], deadline)
        if not ready:
            raise TimeoutError(f"math-verify took longer than {deadline} s {what}; its process was killed")
        reply = self.process.stdout.readline()
        if not reply:
            raise self._exited()
        return json.loads(reply)

    def _exited(self) -> MathVerifierError:
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = "unknown: it closed its pipes but still runs"
        return MathVerifierError(f"the math-verify process exited with code {code}")

    def close(self, kill: bool = False) -> None:
        """End the process: SIGKILL if `kill`, else EOF on its stdin and SIGKILL after a second."""
        try:
            if kill:
                self.process.kill()
            self.process.stdin.close()
            self.process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _close_all(processes: list[_VerifierProcess]) -> None:
    while processes:
        processes.pop().close()


class MathVerifier:
    """`verifier(text, answer) -> bool`: does the final answer of `text` equal `answer`? Thread-safe.

    Each call borrows an idle child process (starting one if none is idle) and returns it afterwards; a
    process that timed out or failed is closed instead, and the next call starts a fresh one.
    """

    def __init__(self, timeout: int = MATH_VERIFY_TIMEOUT, deadline: float = CHECK_DEADLINE):
        if not (isinstance(timeout, int) and timeout >= 1):
            raise ValueError(f"timeout must be a whole number of seconds >= 1 (signal.alarm), got {timeout!r}")
        self.timeout = timeout
        self.deadline = deadline
        self._idle: list[_VerifierProcess] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._idle)  # at garbage collection or interpreter exit

    def __call__(self, text: str, answer: str) -> bool:
        with self._lock:
            process = self._idle.pop() if self._idle else None
        process = process or _VerifierProcess(self.timeout)
        try:
            reply = process.ask({"text": final_answer_text(text), "answer": final_answer_text(answer)},
                                self.deadline)
        except BaseException:
            process.close(kill=True)
            raise
        with self._lock:
            self._idle.append(process)
        if "error" in reply:
            raise MathVerifierError(reply["error"])
        return reply["match"]

    def close(self) -> None:
        """End the idle processes (a later call starts new ones)."""
        with self._lock:
            _close_all(self._idle)


_MATH_VERIFIER = MathVerifier()


def math_reward(prompt: str, response: str, answer: str | None, metadata: dict) -> float:
    """1.0 if the response's final answer equals `answer` by math-verify, else 0.0 (module docstring)."""
    if answer is None:
        raise ValueError("math_reward needs a reference answer; this prompt has none")
    return 1.0 if _MATH_VERIFIER(response, answer) else 0.0


def load_reward_fn(spec: str) -> RewardFn:
    """"math" -> math_reward; "package.module:function" or "package.module.function" -> that function."""
    if spec == "math":
        return math_reward
    module_name, colon, attribute = spec.partition(":")
    if not colon:
        module_name, _, attribute = spec.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"reward {spec!r}: expected 'math' or a function as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r}: {type(error).__name__}: {error}") from error
    try:
        fn = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError as error:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attribute!r}") from error
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("prompt", "response", "answer", {})
    except TypeError as error:
        raise ValueError(f"reward {spec!r}: must accept (prompt, response, answer, metadata): {error}") from error
    except ValueError:  # no signature to inspect (some builtins): checked at the first call instead
        pass
    return fn


class RewardComputer:
    """Applies a RewardFn to a batch of (prompt, response, answer, metadata); never raises for a sample.

    A sample whose function raises an Exception, or returns a non-number (NonNumericReward) or a
    non-finite number (NonFiniteReward), gets reward 0.0 and is counted under that kind; the first message
    of each kind is kept in `first_messages` and logged once. Bools and numpy scalars are numbers.
    With num_workers > 1 the samples are scored by that many threads; the order is kept.
    """

    def __init__(self, fn: RewardFn, num_workers: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.fn = fn
        self.num_workers = num_workers
        self.first_messages: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, items: list[tuple[str, str, str | None, dict]]) -> tuple[list[float], dict[str, int]]:
        if self.num_workers == 1 or len(items) <= 1:
            outcomes = [self._score(item) for item in items]
        else:
            with ThreadPoolExecutor(min(self.num_workers, len(items))) as pool:
                outcomes = list(pool.map(self._score, items))
        errors = Counter(kind for _, kind in outcomes if kind is not None)
        return [reward for reward, _ in outcomes], dict(errors)

    def _score(self, item: tuple[str, str, str | None, dict]) -> tuple[float, str | None]:
        try:
            value = self.fn(*item)
        except Exception as error:
            return self._error(type(error).__name__, str(error))
        if not isinstance(value, numbers.Real):
            return self._error("NonNumericReward", f"the reward function returned {type(value).__name__} "
                                                   f"{repr(value)[:80]}")
        if not math.isfinite(value):
            return self._error("NonFiniteReward", f"the reward function returned {value}")
        return float(value), None

    def _error(self, kind: str, message: str) -> tuple[float, str]:
        with self._lock:
            first = kind not in self.first_messages
            if first:
                self.first_messages[kind] = message
        if first:
            logger.warning("reward %s: %s (reward 0.0; later errors of this kind are only counted)", kind, message)
        return 0.0, kind


def _serve(timeout: int) -> None:
    """The child process of MathVerifier: one JSON request per stdin line -> one JSON reply per stdout line."""
    from math_verify import parse, verify

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the replies
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts are mismatches, not news
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()

    @functools.lru_cache(maxsize=4096)
    def parse_reference(answer: str) -> list:
        latex = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        parsed = parse(latex, parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)
        if not parsed:
            raise ValueError(f"math-verify cannot parse the reference answer {answer!r}")
        return parsed

    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse_reference(request["answer"])
            predicted = parse(request["text"], parsing_timeout=timeout)
            reply = {"match": bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

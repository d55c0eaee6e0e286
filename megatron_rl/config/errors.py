"""`ConfigError` and the translation of pydantic's validation errors into it.

Every problem with a configuration becomes one `(dotted key, message)` pair, for example
`("algorithm.kpo.q", "must be > 0, got -1.0")` or `("parallel.tp", "expected > 0, got 0")`.
"""

import re

import yaml
from pydantic import ValidationError

from megatron_rl.algorithms.hyperparams import HyperparameterError

Error = tuple[str, str]

_COMPARISONS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_LENGTHS = {"too_short": ("min_length", "at least"), "too_long": ("max_length", "at most")}
# pydantic's "Input should be a valid integer, unable to parse string as an integer": the part
# after the comma repeats what `got ...` shows.
_PYDANTIC_DETAIL = re.compile(r", (unable to|got) .*$")


class ConfigError(ValueError):
    """Every problem found in a run configuration; `errors` holds (dotted key, message) pairs.

    It is a ValueError so that a validator can raise several keyed errors at once: pydantic wraps
    it, and `errors_from_validation` unwraps it and prefixes its keys with the validator's place.
    """

    def __init__(self, errors: list[Error]):
        self.errors = list(errors)
        super().__init__("\n".join(f"{key}: {message}" for key, message in self.errors))


class ErrorCollector:
    """Collects failed checks of a validator and raises them together as one ConfigError."""

    def __init__(self):
        self.errors: list[Error] = []

    def add(self, key: str, message: str) -> None:
        self.errors.append((key, message))

    def require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.add(key, message)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)


def join_key(prefix: str, key: str) -> str:
    """`join_key("algorithm", "kpo.q")` is "algorithm.kpo.q"; an index joins without a dot."""
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def dotted_key(loc: tuple[str | int, ...]) -> str:
    """pydantic's error location ("rollout", "engines", 1, "port") as "rollout.engines[1].port"."""
    key = ""
    for part in loc:
        key = join_key(key, f"[{part}]" if isinstance(part, int) else part)
    return key


def errors_from_validation(exc: ValidationError) -> list[Error]:
    """One (dotted key, message) per problem in a pydantic ValidationError."""
    errors: list[Error] = []
    for error in exc.errors():
        key = dotted_key(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError | HyperparameterError):
            errors += [(join_key(key, inner_key), message) for inner_key, message in cause.errors]
        elif isinstance(cause, ValueError):
            errors.append((key, str(cause)))
        else:
            errors.append((key, _expected_got(error)))
    return errors


def _expected_got(error: dict) -> str:
    """pydantic's type or constraint error as "expected <what>, got <input>"."""
    if error["type"] == "missing":
        return "missing"
    message = error["msg"]
    if error["type"] in _COMPARISONS:
        bound, operator = _COMPARISONS[error["type"]]
        expected = f"{operator} {error['ctx'][bound]}"
    elif error["type"] in _LENGTHS:
        bound, comparison = _LENGTHS[error["type"]]
        count = error["ctx"][bound]
        expected = f"{comparison} {count} item{'' if count == 1 else 's'}"
    elif message.startswith("Input should be "):
        expected = _PYDANTIC_DETAIL.sub("", message.removeprefix("Input should be "))
    else:
        return f"{message[0].lower()}{message[1:]}, got {error['input']!r}"
    return f"expected {expected}, got {error['input']!r}"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A PyYAML error on one line: what is wrong and, when known, where."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return str(exc).replace("\n", " ")
    mark = exc.problem_mark
    return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"

"""Dotted command-line overrides such as `parallel.tp=2` or `algorithm.corrections.tis.threshold=3`.

The value is read as a YAML scalar or flow collection, so `1e-4`, `true`, `null` and `[2.0, 3.0]`
mean what they mean in the config file. Missing or null sections on the way to the key are
created, so an override can switch on a correction that is off (null) by default.
"""

import copy
import re
from collections.abc import Iterable, Mapping

import yaml

from megatron_rl.config.errors import Error, ErrorCollector, yaml_problem

_DOTTED_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def apply_overrides(raw: Mapping, overrides: Iterable[str]) -> tuple[dict, list[Error]]:
    """A copy of `raw` with every well-formed `key=value` override set, and one error per other one."""
    result = copy.deepcopy(dict(raw))
    problems = ErrorCollector()
    for override in overrides:
        key, has_value, value_text = override.partition("=")
        key = key.strip()
        if not has_value or not _DOTTED_KEY.match(key):
            problems.add(override, "expected an override of the form dotted.key=value")
            continue
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError as exc:
            problems.add(key, f"the value {value_text!r} is not valid YAML ({yaml_problem(exc)})")
            continue
        _set(result, key.split("."), value, problems)
    return result, problems.errors


def _set(raw: dict, path: list[str], value: object, problems: ErrorCollector) -> None:
    node = raw
    for depth, name in enumerate(path[:-1]):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            problems.add(".".join(path[: depth + 1]),
                         f"is {child!r}, not a section, so '{path[depth + 1]}' cannot be set in it")
            return
        node = child
    node[path[-1]] = value


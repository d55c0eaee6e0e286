"""YAML file + dotted overrides -> validated `RunConfig`, and `RunConfig` -> YAML.

Every error is reported at once: malformed overrides are reported and skipped, the walk of
unknown_keys.py reports (and removes) keys the schema does not have, then pydantic validates the
rest; all three lists are raised together as one ConfigError.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from megatron_rl.config.errors import ConfigError, errors_from_validation, yaml_problem
from megatron_rl.config.overrides import apply_overrides
from megatron_rl.config.schema import RunConfig
from megatron_rl.config.unknown_keys import split_unknown_keys


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML file at `path`, apply `key=value` overrides, validate."""
    return config_from_dict(_read_yaml(Path(path)), overrides)


def config_from_dict(raw: Mapping, overrides: Iterable[str] = ()) -> RunConfig:
    """Validate a configuration given as nested dicts (as YAML gives it), after overrides."""
    if not isinstance(raw, Mapping):
        raise ConfigError([("(top level)", f"expected a mapping of sections, got {type(raw).__name__}")])
    overridden, errors = apply_overrides(raw, overrides)
    known, unknown_key_errors = split_unknown_keys(overridden, RunConfig)
    errors += unknown_key_errors
    try:
        config = RunConfig.model_validate(known)
    except ValidationError as exc:
        errors += errors_from_validation(exc)
    if errors:
        raise ConfigError(errors)
    return config


def dump_config(config: RunConfig) -> str:
    """The complete configuration as YAML, every key written; loading it gives `config` back."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read the file: {exc.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([(str(path), f"invalid YAML: {yaml_problem(exc)}")]) from None
    return {} if raw is None else raw

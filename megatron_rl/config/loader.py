"""YAML file + dotted overrides -> validated `RunConfig`, and `RunConfig` -> YAML.

Every error is reported at once: malformed overrides are reported and skipped, the walk of
unknown_keys.py reports (and removes) keys the schema does not have, then pydantic validates the
rest; all three lists are raised together as one ConfigError.

With `model.hf_path` set, the architecture comes from that checkpoint's config.json before
validation (`models.hf_config.model_config_from_hf`), so the layout rules (tp divides the heads, ep
the experts, the sequence fits the positions) are checked against the real model: model keys the
file leaves out are the checkpoint's, and a key it sets must agree with the checkpoint.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from megatron_rl.config.errors import ConfigError, errors_from_validation, yaml_problem
from megatron_rl.config.overrides import apply_overrides
from megatron_rl.config.schema import RunConfig
from megatron_rl.config.unknown_keys import split_unknown_keys
from megatron_rl.models.hf_config import model_config_from_hf, read_hf_config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML file at `path`, apply `key=value` overrides, validate."""
    return config_from_dict(_read_yaml(Path(path)), overrides)


def config_from_dict(raw: Mapping, overrides: Iterable[str] = ()) -> RunConfig:
    """Validate a configuration given as nested dicts (as YAML gives it), after overrides."""
    if not isinstance(raw, Mapping):
        raise ConfigError([("(top level)", f"expected a mapping of sections, got {type(raw).__name__}")])
    overridden, errors = apply_overrides(raw, overrides)
    model = overridden.get("model") if isinstance(overridden.get("model"), Mapping) else {}
    architecture, architecture_errors = _checkpoint_architecture(model.get("hf_path"))
    errors += architecture_errors
    if architecture:
        overridden = {**overridden, "model": {**architecture, **model}}
    known, unknown_key_errors = split_unknown_keys(overridden, RunConfig)
    errors += unknown_key_errors
    try:
        config = RunConfig.model_validate(known)
    except ValidationError as exc:
        errors += errors_from_validation(exc)
    else:
        errors += [(f"model.{key}", f"is {getattr(config.model, key)!r} but {model['hf_path']}/config.json says "
                                    f"{value!r}; leave it out to take the checkpoint's")
                   for key, value in architecture.items() if key in model and getattr(config.model, key) != value]
    if errors:
        raise ConfigError(errors)
    return config


def _checkpoint_architecture(hf_path: object) -> tuple[dict, list]:
    """ModelConfig's architecture fields from hf_path/config.json ({} when hf_path is unset), and the error
    naming model.hf_path when it cannot be read or describes a model Megatron cannot mirror."""
    if not isinstance(hf_path, str):
        return {}, []
    try:
        return model_config_from_hf(read_hf_config(hf_path)), []
    except (OSError, ValueError) as exc:  # no config.json, invalid JSON, an unsupported architecture
        return {}, [("model.hf_path", str(exc))]


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

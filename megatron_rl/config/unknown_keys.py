"""Unknown keys in a raw configuration, found at any depth by walking it against the schema.

The walk knows pydantic models (keys are field aliases) and dataclasses, including the stdlib
ones of `megatron_rl.algorithms.hyperparams`; it descends through optional sections and lists of
sections. Each unknown key is reported with the closest valid name, and removed, so that
validating what remains reports the other errors of the same configuration.
"""

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping

from pydantic import BaseModel

from megatron_rl.config.errors import Error, join_key


def split_unknown_keys(raw: Mapping, schema: type) -> tuple[dict, list[Error]]:
    """Return `raw` without its unknown keys, and one (dotted key, message) per unknown key."""
    errors: list[Error] = []
    return _known_part(raw, schema, "", errors), errors


def _known_part(raw: Mapping, schema: type, prefix: str, errors: list[Error]) -> dict:
    fields = schema_fields(schema)
    known = {}
    for name, value in raw.items():
        key = join_key(prefix, str(name))
        if name in fields:
            known[name] = _clean(value, fields[name], key, errors)
        else:
            errors.append((key, _unknown_key_message(str(name), list(fields))))
    return known


def _clean(value: object, annotation: object, key: str, errors: list[Error]) -> object:
    """`value` with unknown keys removed wherever `annotation` says it holds sections."""
    annotation = without_none(annotation)
    if is_section(annotation) and isinstance(value, Mapping):
        return _known_part(value, annotation, key, errors)
    if typing.get_origin(annotation) is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        return [_clean(element, item, f"{key}[{index}]", errors) for index, element in enumerate(value)]
    return value


def schema_fields(schema: type) -> dict[str, object]:
    """Key in the YAML -> type annotation, for a pydantic model or a dataclass."""
    if issubclass(schema, BaseModel):
        return {field.alias or name: field.annotation for name, field in schema.model_fields.items()}
    hints = typing.get_type_hints(schema)
    return {field.name: hints[field.name] for field in dataclasses.fields(schema)}


def without_none(annotation: object) -> object:
    """`X | None` -> X; any other annotation unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    )


def _unknown_key_message(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; expected one of: {', '.join(valid)}"

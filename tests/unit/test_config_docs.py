"""docs/config.md documents every configuration key, with the default and allowed values the code has.

The expected keys come from the code, not from a list kept here: the leaves of
`dump_config(RunConfig())`, walked against the schema's types. Where the dump cannot show a
section's keys, the walk takes them from the section's type, with that type's own defaults:

- a sub-section that is null by default (`algorithm.corrections.tis`) is documented itself
  (default null) and so is each of its keys (`algorithm.corrections.tis.level`, default token);
- a list of sections (`rollout.engines`) is documented itself (default: the whole list) and so is
  each key of an item, as `rollout.engines[].kind`.

A documented default is the cell's text between backticks read with yaml.safe_load, and must equal
the code's value with the same YAML type (write `2.0` for a float, `[2.0, 3.0]` for a pair).
"""

import functools
import re
import typing
from pathlib import Path

import pydantic
import yaml
from doc_tables import markdown_tables

from megatron_rl.algorithms.hyperparams import DEFAULT_AGGREGATION, FIXED_AGGREGATION, LossName
from megatron_rl.config import RunConfig, dump_config
from megatron_rl.config.unknown_keys import is_section, schema_fields, without_none

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"

_DOTTED_KEY = re.compile(r"^`([A-Za-z_]\w*(?:(?:\.|\[\]\.)[A-Za-z_]\w*)*)`$")
_CODE = re.compile(r"^`([^`]+)`$")
_CODE_SPANS = re.compile(r"`([^`]+)`")


# --- the document ---------------------------------------------------------------------------


def documented_keys(text: str) -> dict[str, str]:
    """dotted key -> the default cell, from every table with a `key` and a `default` column."""
    rows: dict[str, str] = {}
    for header, body in markdown_tables(text):
        if "key" not in header or "default" not in header:
            continue
        key_at, default_at = header.index("key"), header.index("default")
        for row in body:
            assert len(row) == len(header), f"row {row} has {len(row)} cells, the header {len(header)}"
            match = _DOTTED_KEY.match(row[key_at])
            assert match, f"key cell {row[key_at]!r} is not one `dotted.key`"
            assert match[1] not in rows, f"{match[1]} is documented twice"
            rows[match[1]] = row[default_at]
    return rows


def type_cells(text: str) -> dict[str, str]:
    """dotted key -> the `type / allowed values` cell."""
    cells: dict[str, str] = {}
    for header, body in markdown_tables(text):
        if "key" in header and "type / allowed values" in header:
            key_at, type_at = header.index("key"), header.index("type / allowed values")
            cells.update({_DOTTED_KEY.match(row[key_at])[1]: row[type_at] for row in body})
    return cells


def parse_default(cell: str) -> object:
    match = _CODE.match(cell)
    assert match, f"default cell {cell!r} is not one `code span`"
    return yaml.safe_load(match[1])


# --- the code -------------------------------------------------------------------------------


def _own_defaults(section: type) -> dict:
    """A section type's defaults as the YAML dump writes them (tuples as lists)."""
    dumped = pydantic.TypeAdapter(section).dump_python(section(), mode="json", by_alias=True)
    return yaml.safe_load(yaml.safe_dump(dumped))


def schema_keys(values: dict, schema: type, prefix: str = "") -> dict[str, tuple[object, object]]:
    """dotted key -> (default, annotation) for every documented key under `schema`."""
    fields = schema_fields(schema)
    assert set(values) == set(fields), f"{prefix or 'the root'}: dump {sorted(values)} vs schema {sorted(fields)}"
    keys: dict[str, tuple[object, object]] = {}
    for name, annotation in fields.items():
        key, value, inner = f"{prefix}{name}", values[name], without_none(annotation)
        if is_section(inner) and value is not None:
            keys.update(schema_keys(value, inner, f"{key}."))
            continue
        keys[key] = (value, annotation)
        if is_section(inner):  # an optional sub-section, null by default
            keys.update(schema_keys(_own_defaults(inner), inner, f"{key}."))
        elif typing.get_origin(inner) is list and is_section(item := typing.get_args(inner)[0]):
            keys.update(schema_keys(_own_defaults(item), item, f"{key}[]."))
    return keys


@functools.cache
def default_keys(config_class: type[RunConfig] = RunConfig) -> dict[str, tuple[object, object]]:
    return schema_keys(yaml.safe_load(dump_config(config_class())), config_class)


def same_yaml_value(documented: object, actual: object) -> bool:
    """Equal, with the same YAML types all the way down (1 is not 1.0, true is not 1)."""
    if isinstance(actual, list):
        return (isinstance(documented, list) and len(documented) == len(actual)
                and all(map(same_yaml_value, documented, actual)))
    if isinstance(actual, dict):
        return (isinstance(documented, dict) and documented.keys() == actual.keys()
                and all(same_yaml_value(documented[k], actual[k]) for k in actual))
    return type(documented) is type(actual) and documented == actual


# --- the tests ------------------------------------------------------------------------------


def test_every_key_is_documented_and_nothing_else():
    documented, expected = set(documented_keys(DOC.read_text())), set(default_keys())
    assert not expected - documented, f"keys of the schema missing from {DOC.name}: {sorted(expected - documented)}"
    assert not documented - expected, f"keys in {DOC.name} that the schema has not: {sorted(documented - expected)}"


def test_documented_defaults_are_the_code_defaults():
    actual = default_keys()
    wrong = [
        f"{key}: documented {cell}, code {actual[key][0]!r}"
        for key, cell in documented_keys(DOC.read_text()).items()
        if key in actual and not same_yaml_value(parse_default(cell), actual[key][0])
    ]
    assert not wrong, "\n".join(wrong)


def test_documented_choices_are_the_code_choices():
    """A Literal field's type cell lists exactly its values, each as a code span."""
    cells = type_cells(DOC.read_text())
    wrong = []
    for key, (_, annotation) in default_keys().items():
        inner = without_none(annotation)
        if typing.get_origin(inner) is not typing.Literal or key not in cells:
            continue
        documented = [yaml.safe_load(span) for span in _CODE_SPANS.findall(cells[key])]
        if sorted(map(repr, documented)) != sorted(map(repr, typing.get_args(inner))):
            wrong.append(f"{key}: documented {documented}, code {list(typing.get_args(inner))}")
    assert not wrong, "\n".join(wrong)


def test_aggregation_table_is_the_losses_aggregation():
    (body,) = [rows for header, rows in markdown_tables(DOC.read_text())
               if header == ["loss", "aggregation", "other modes allowed"]]
    documented = {_CODE.match(loss)[1]: (aggregation, allowed) for loss, aggregation, allowed in body}
    expected = {
        loss: ("mean over sequences" if mode is None else f"`{mode}`", "no" if loss in FIXED_AGGREGATION else "yes")
        for loss, mode in DEFAULT_AGGREGATION.items()
    }
    assert set(DEFAULT_AGGREGATION) == set(typing.get_args(LossName))
    assert documented == expected

"""The runs of a sweep: `--grid KEY=V1,V2,...` options x seeds -> named runs with their overrides.

    axes = [parse_grid_option("algorithm.loss=kpo,vespo"), parse_grid_option("rollout.max_staleness=1,2")]
    runs = expand_grid(axes, seeds=2)   # 2 x 2 points x 2 seeds = 8 runs

The runs are ordered seed-major (every grid point of seed 0, then of seed 1, ...), so that a sweep stopped
half-way already compares every grid value. Grid values stay the text given on the command line: it is
both the override's value (read as YAML, as any override) and, made filesystem-safe, part of the run's
name, so `1e-4` names a run `...=1e-4`, not `...=0.0001`.

A run's name is `KEY=VALUE__KEY=VALUE__seed=S` with the full dotted keys in the order of the --grid
options; characters other than letters, digits and `.+-` in a value become `_`.

A named-variant axis (built in code, e.g. by a study; not a --grid option) gives each value a set of
overrides instead: `GridAxis("variant", ("trm-max", "trm-avg"), ((...overrides of trm-max), (...)))`; its key
is a label, not a config key, and a run of value i gets the overrides i.
"""

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

SEED_KEY = "data.seed"
MAX_NAME_LENGTH = 200  # bytes of a directory name; longer names are cut and end in a hash of the whole
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")
_DOTTED_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_OPENING, _CLOSING, _QUOTES = "[{(", "]})", "'\""


class GridError(ValueError):
    """A malformed --grid option or --seeds value; the message names it."""


@dataclass(frozen=True)
class GridAxis:
    """One --grid option: a dotted config key and its values, as given. With `variants`, a named-variant
    axis: `key` is a label and value i stands for the `key=value` overrides variants[i]."""

    key: str
    values: tuple[str, ...]
    variants: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        if self.variants is not None and len(self.variants) != len(self.values):
            raise GridError(f"axis {self.key}: {len(self.values)} values but {len(self.variants)} override sets")

    def overrides(self, value: str) -> tuple[str, ...]:
        """The overrides that set this axis to `value`."""
        if self.variants is None:
            return (f"{self.key}={value}",)
        return self.variants[self.values.index(value)]

    def config_keys(self) -> tuple[str, ...]:
        """The config keys this axis sets."""
        if self.variants is None:
            return (self.key,)
        return tuple(dict.fromkeys(text.partition("=")[0].strip() for texts in self.variants for text in texts))


@dataclass(frozen=True)
class RunPoint:
    """One run of the sweep: a value of every grid key, and a seed."""

    point: tuple[tuple[str, str], ...]  # (key, value text) in the order of the --grid options
    seed: int
    point_overrides: tuple[str, ...] = ()  # the overrides of the point; default: `key=value` for each of `point`

    @property
    def name(self) -> str:
        return run_name(self.point, self.seed)

    @property
    def point_label(self) -> str:
        return point_label(self.point)

    def overrides(self) -> list[str]:
        """The grid point and the seed as `key=value` overrides."""
        point = self.point_overrides or tuple(f"{key}={value}" for key, value in self.point)
        return [*point, f"{SEED_KEY}={self.seed}"]


def point_label(point: Iterable[tuple[str, str]]) -> str:
    """`algorithm.loss=kpo rollout.max_staleness=2` (a grid point, no seed), or `(no grid)`."""
    return " ".join(f"{key}={value}" for key, value in point) or "(no grid)"


def parse_grid_option(text: str) -> GridAxis:
    """`KEY=V1,V2,...` -> GridAxis. Commas inside brackets, braces or quotes do not split: `k=[1, 2],[3]`."""
    key, has_values, values_text = text.partition("=")
    key = key.strip()
    if not has_values or not _DOTTED_KEY.match(key):
        raise GridError(f"--grid {text!r}: expected KEY=V1,V2,... with a dotted config key")
    values = tuple(value.strip() for value in split_top_level(values_text))
    if any(not value for value in values):
        raise GridError(f"--grid {text!r}: empty value (values are separated by single commas)")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise GridError(f"--grid {text!r}: the value(s) {', '.join(repeated)} appear more than once")
    return GridAxis(key, values)


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas that are not inside brackets, braces, parentheses or quotes."""
    parts, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in _QUOTES:
            quote = char
        elif char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def expand_grid(axes: list[GridAxis], seeds: int) -> list[RunPoint]:
    """The cartesian product of the axes' values x seeds 0..seeds-1, seed-major; names checked unique."""
    if seeds < 1:
        raise GridError(f"--seeds: expected an integer >= 1, got {seeds}")
    keys = [axis.key for axis in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise GridError(f"--grid: the key(s) {', '.join(repeated)} are given by more than one --grid option")
    if SEED_KEY in (key for axis in axes for key in axis.config_keys()):
        raise GridError(f"--grid {SEED_KEY}: the seeds are set by --seeds N (runs seed 0..N-1)")
    points = [(tuple(zip(keys, values, strict=True)),
               tuple(text for axis, value in zip(axes, values, strict=True) for text in axis.overrides(value)))
              for values in product(*(axis.values for axis in axes))]
    runs = [RunPoint(point, seed, overrides) for seed in range(seeds) for point, overrides in points]
    first_with_name: dict[str, RunPoint] = {}
    for run in runs:
        other = first_with_name.setdefault(run.name, run)
        if other is not run:
            raise GridError(f"--grid: the grid points {other.point_label!r} and {run.point_label!r} have the same "
                            f"directory name {run.name!r} (values differ only in characters other than letters, "
                            f"digits and .+-)")
    return runs


def run_name(point: tuple[tuple[str, str], ...], seed: int) -> str:
    """The run's directory name: stable (from the keys and value texts only), readable, filesystem-safe."""
    name = "__".join([f"{key}={_UNSAFE.sub('_', value)}" for key, value in point] + [f"seed={seed}"])
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[:MAX_NAME_LENGTH - len(digest) - 1]}-{digest}"

"""Print one value of a resolved run config, for launch scripts.

    python launch/config_value.py parallel.world_size CONFIG [key=value ...]

The key is dotted (`rollout.token_env`); null prints an empty line. Exit code 2, with the reason on
stderr, when the config does not load or has no such key.
"""

import sys

from pydantic import BaseModel

from megatron_rl.config import ConfigError, load_config

USAGE = "usage: config_value.py KEY CONFIG [key=value ...]"


def config_value(key: str, config_path: str, overrides: list[str]) -> object:
    value = load_config(config_path, overrides)
    for depth, name in enumerate(key.split(".")):
        if not isinstance(value, BaseModel) or name not in type(value).model_fields:
            raise KeyError(f"{key}: the config has no key {'.'.join(key.split('.')[:depth + 1])!r}")
        value = getattr(value, name)
    return value


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        value = config_value(argv[0], argv[1], argv[2:])
    except (ConfigError, KeyError) as exc:
        print(exc.args[0] if isinstance(exc, KeyError) else exc, file=sys.stderr)
        return 2
    print("" if value is None else value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

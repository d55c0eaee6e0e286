"""The `megatron-rl` command: parses arguments and calls the package; no logic of its own.

Each subcommand is one function that adds its parser and sets `run`, the function that executes
it and returns the exit code; to add a subcommand, write such a function and list it in
SUBCOMMANDS.
"""

import argparse
import sys

from megatron_rl.config import ConfigError, dump_config, load_config

EXIT_CONFIG_ERROR = 2


def _validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(dump_config(config))
    return 0


def _add_validate(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "validate", help="check a config file; print it resolved (every key), or every error",
        description="Print the resolved configuration as YAML and exit 0, or print every error "
                    f"(one per line, key first) to stderr and exit {EXIT_CONFIG_ERROR}.")
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, values read as YAML: parallel.tp=2 algorithm.kpo.q=1e-4")
    parser.set_defaults(run=_validate)


SUBCOMMANDS = (_add_validate,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-rl", description="RL post-training of LLMs: Megatron-Core learners, SGLang rollouts.")
    subcommands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

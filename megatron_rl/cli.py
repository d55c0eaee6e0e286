"""The `megatron-rl` command: parses arguments and calls the package; no logic of its own.

Each subcommand is one function that adds its parser and sets `run`, the function that executes
it and returns the exit code; to add a subcommand, write such a function and list it in
SUBCOMMANDS.
"""

import argparse
import shlex
import sys
from pathlib import Path

from megatron_rl.config import ConfigError, RunConfig, dump_config, load_config

EXIT_CONFIG_ERROR = 2


def _load(args: argparse.Namespace) -> RunConfig | None:
    """args.config with args.overrides, validated; None after printing every error to stderr."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
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


def _train(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    from megatron_rl.trainer import train_from_config

    train_from_config(config)
    return 0


def _add_train(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "train", help="run RL training (on every learner rank: torchrun ... -m megatron_rl.cli train CONFIG)",
        description="The RL loop of megatron_rl/trainer.py. Run it on every learner rank, e.g. "
                    "`torchrun --nproc-per-node 2 -m megatron_rl.cli train CONFIG`; rank 0 starts the "
                    "rollout engines of rollout.engines that have launch: true.")
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, values read as YAML")
    parser.set_defaults(run=_train)


def _toy_task(args: argparse.Namespace) -> int:
    from megatron_rl.data.toy_task import write_toy_task

    out = write_toy_task(args.out_dir, num_prompts=args.prompts, seed=args.seed)
    print(f"wrote {out}/model (HF checkpoint + tokenizer) and {out}/train.jsonl ({args.prompts} prompts)")
    return 0


def _add_toy_task(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "toy-task", help="write the quickstart's task: a tiny random Qwen3 + tokenizer and its prompts",
        description="Builds, offline and from a seed, a word-level tokenizer, a random 2-layer Qwen3 checkpoint "
                    "and 'Repeat the number: 7' -> '7' prompts (megatron_rl/data/toy_task.py).")
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=_toy_task)


def _serve(args: argparse.Namespace) -> int:
    from megatron_rl.rollout.cpu_server import serve

    return serve(args.model_path, host=args.host, port=args.port, token=args.token, no_token=args.no_token,
                 dtype=args.dtype, max_batch_size=args.max_batch_size, threads=args.threads,
                 logit_noise_std=args.logit_noise_std, logit_noise_seed=args.logit_noise_seed)


def _add_serve(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "serve", help="a CPU rollout server speaking SGLang's HTTP API (HF transformers; real weight updates)",
        description="Serves /generate, the weight updates and the admin endpoints of SGLang's native API over a "
                    "Hugging Face checkpoint (megatron_rl/rollout/cpu_server.py). Needs a token "
                    "($MEGATRON_RL_SERVE_TOKEN, or --token, which `ps` shows) unless --no-token (loopback only).")
    parser.add_argument("--model-path", required=True, help="a local HF checkpoint directory (*.safetensors)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--token", default=None, help="the bearer token (default: $MEGATRON_RL_SERVE_TOKEN)")
    parser.add_argument("--no-token", action="store_true",
                        help="serve without a token: every endpoint, weight updates included, is open to anyone "
                             "who can connect (accepted on a loopback --host only)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-batch-size", type=int, default=64, help="requests per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--logit-noise-std", type=float, default=0.0, metavar="S",
                        help="add S * N(0, 1) noise to the tempered logits of every decode step, before the logprob "
                             "and the sampling: a train-inference mismatch of known size (default 0: off)")
    parser.add_argument("--logit-noise-seed", type=int, default=0, metavar="K",
                        help="seed of that noise; with a request's sampling_seed it fixes the noise (default 0)")
    parser.set_defaults(run=_serve)


def _convert(args: argparse.Namespace) -> int:
    from megatron_rl.convert import REFUSALS, convert_hf_to_megatron, convert_megatron_to_hf

    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "overwrite": args.overwrite}
    try:
        if args.direction == "hf-to-megatron":
            convert_hf_to_megatron(args.hf_dir, args.out_dir, **layout)
        else:
            convert_megatron_to_hf(args.checkpoint_dir, args.out_dir, args.hf_config, step=args.step,
                                   max_shard_bytes=int(args.max_shard_gib * 2**30), **layout)
    except REFUSALS as exc:
        print(f"convert {args.direction}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


def _add_convert(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "convert", help="Hugging Face safetensors <-> Megatron dist checkpoint, at any TP/PP/EP layout",
        description="Run on every rank of the layout (torchrun --nproc-per-node N -m megatron_rl.cli convert ...; "
                    "N a multiple of tp * pp and of ep * etp * pp) or as one process for the 1-rank layout. "
                    "megatron_rl/convert.py describes both directions.")
    layout = argparse.ArgumentParser(add_help=False)
    for size in ("tp", "pp", "ep", "etp"):
        layout.add_argument(f"--{size}", type=int, default=1, help=f"{size} size of the job's layout (default 1)")
    layout.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it exists, once the new one is complete")
    directions = parser.add_subparsers(title="directions", required=True, metavar="DIRECTION")
    to_megatron = directions.add_parser(
        "hf-to-megatron", parents=[layout], help="HF checkpoint -> Megatron dist checkpoint (step 0, weights only)",
        description="The model config comes from HF_DIR/config.json; the checkpoint loads at any layout.")
    to_megatron.add_argument("hf_dir", help="a Hugging Face checkpoint directory (config.json + safetensors)")
    to_megatron.add_argument("out_dir", help="the checkpoint directory to write (must not exist)")
    to_megatron.set_defaults(run=_convert, direction="hf-to-megatron")
    to_hf = directions.add_parser(
        "megatron-to-hf", parents=[layout], help="Megatron dist checkpoint (any layout) -> HF safetensors",
        description="Loads the checkpoint at the job's layout and writes sharded safetensors in the HF config's "
                    "dtype, with its config.json and the tokenizer files beside it.")
    to_hf.add_argument("checkpoint_dir", help="a checkpoint directory of megatron-rl (holding `latest`)")
    to_hf.add_argument("out_dir", help="the HF checkpoint directory to write (must not exist)")
    to_hf.add_argument("--hf-config", required=True, help="an HF checkpoint directory or its config.json, "
                       "describing the checkpoint's model")
    to_hf.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    to_hf.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors file (default 5)")
    to_hf.set_defaults(run=_convert, direction="megatron-to-hf")


def _plan(args: argparse.Namespace) -> int:
    from megatron_rl.plan import DEFAULT_GPUS_PER_NODE, format_plan

    try:
        text = format_plan(load_config(args.config, args.overrides),
                           gpus_per_node=args.gpus_per_node or DEFAULT_GPUS_PER_NODE)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(text)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _add_plan(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "plan", help="print where every learner rank and rollout engine runs, and a learner GPU's memory",
        description="The model architecture is read from model.hf_path/config.json (no weights needed). Prints "
                    "every learner rank's node and tensor / context / data / pipeline / expert coordinates in "
                    "Megatron-Core's order, the nodes of rollout.engines, and an estimate of one learner GPU's "
                    "memory (megatron_rl/plan.py states the formulas). Exits "
                    f"{EXIT_CONFIG_ERROR} with every error when the config or the node count does not fit.")
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, values read as YAML")
    parser.add_argument("--gpus-per-node", type=_positive_int, default=None, help="GPUs of one node (default: 8)")
    parser.set_defaults(run=_plan)


def _sweep(args: argparse.Namespace) -> int:
    from megatron_rl.studies.report import write_report
    from megatron_rl.sweep import GridError, SweepError, SweepSpec, parse_grid_option, run_sweep

    grid_options = [part for grid in args.grid for part in ("--grid", grid)]
    command = shlex.join(["megatron-rl", "sweep", args.config, *grid_options, "--seeds", str(args.seeds),
                          "--out", args.out, *args.overrides])
    try:
        spec = SweepSpec(Path(args.config), tuple(parse_grid_option(grid) for grid in args.grid), args.seeds,
                         Path(args.out), tuple(args.overrides), command)
        exit_code = run_sweep(spec)
    except (GridError, SweepError) as exc:
        print(f"megatron-rl sweep: nothing was run:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"report: {write_report(args.out)}")
    return exit_code


def _add_sweep(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "sweep", help="a grid of short RL runs x seeds, one after the other; resumable; a report at the end",
        description="Runs `megatron-rl train` (torchrun, parallel.world_size ranks) for every grid point and seed "
                    "0..N-1 (data.seed), each in its own directory DIR/<name> (config.yaml, run.log, metrics.jsonl, "
                    "wandb/, checkpoints/). Every run's config is validated before the first starts. Finished runs "
                    "are skipped when the command is run again; unfinished ones start from scratch. Writes "
                    "DIR/sweep.json and DIR/report.md with reward plots. Exits 1 if a run failed, "
                    f"{EXIT_CONFIG_ERROR} for bad settings (megatron_rl/sweep/).")
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeat for more keys: their cartesian product)")
    parser.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0..N-1 per grid point (default 1)")
    parser.add_argument("--out", required=True, help="the sweep directory")
    parser.set_defaults(run=_sweep)


def _report(args: argparse.Namespace) -> int:
    from megatron_rl.studies.report import write_report

    try:
        print(write_report(args.sweep_dir))
    except FileNotFoundError as exc:
        print(f"megatron-rl report: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


def _add_report(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "report", help="redraw a sweep's reward plots and markdown report from its directory",
        description="Reads DIR/sweep.json and the runs' metrics; writes DIR/reward_curves.png, DIR/final_reward.png "
                    "and DIR/report.md (megatron_rl/studies/report.py).")
    parser.add_argument("sweep_dir", help="the --out directory of a sweep")
    parser.set_defaults(run=_report)


def _study(args: argparse.Namespace) -> int:
    from megatron_rl.studies.catalog import STUDIES
    from megatron_rl.studies.study import run_study, study_run
    from megatron_rl.sweep import GridError, SweepError

    run = study_run(args.name, smoke=args.smoke, seeds=args.seeds, out=args.out, report_dir=args.report_dir,
                    config=args.config, overrides=args.overrides)
    try:
        exit_code, report = run_study(STUDIES[args.name], run)
    except (ConfigError, GridError, SweepError) as exc:
        print(f"megatron-rl study {args.name}: nothing was run:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"study report: {report}")
    return exit_code


def _add_study(subcommands: argparse._SubParsersAction) -> None:
    from megatron_rl.studies.study import DEFAULT_CONFIG, DEFAULT_OUT, DEFAULT_REPORT_DIR, FULL_SEEDS, SMOKE_STEPS

    parser = subcommands.add_parser(
        "study", help="a reproduction study (staleness, smoothing, trm): its sweep, figures and markdown report",
        description="Runs the study's grid of quickstart-style runs as a `megatron-rl sweep` (resumable: finished "
                    "runs are kept), then writes REPORT_DIR/NAME.md with its figures in REPORT_DIR/NAME/ "
                    "(megatron_rl/studies/study.py). The base config's model and prompts must exist (`megatron-rl "
                    "toy-task runs/quickstart/task` for the quickstart). Exits 1 if a run failed, "
                    f"{EXIT_CONFIG_ERROR} for bad settings.")
    parser.add_argument("name", choices=["staleness", "smoothing", "trm"], help="the study")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_STEPS} steps per run, 1 seed, a reduced grid; the report goes into the sweep "
                             "directory (not docs/)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help=f"seeds 0..N-1 per grid point (default {FULL_SEEDS}; 1 with --smoke)")
    parser.add_argument("--out", default=None, help=f"the sweep directory (default {DEFAULT_OUT}/NAME, or "
                                                    f"{DEFAULT_OUT}/NAME-smoke)")
    parser.add_argument("--report-dir", default=None,
                        help=f"where NAME.md and NAME/*.png go (default {DEFAULT_REPORT_DIR}; with --smoke: --out)")
    parser.add_argument("--config", default=None, help=f"the base config (default {DEFAULT_CONFIG})")
    parser.set_defaults(run=_study)


SUBCOMMANDS = (_add_validate, _add_train, _add_toy_task, _add_serve, _add_convert, _add_plan, _add_sweep, _add_report,
               _add_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-rl", description="RL post-training of LLMs: Megatron-Core learners, SGLang rollouts.")
    subcommands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow the options (`sweep CONFIG --out DIR key=value`): argparse has
    # already closed the positional list when it meets them
    if extra and (not hasattr(args, "overrides") or any(arg.startswith("-") for arg in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The rollout engines of a Slurm job: which node runs which, run them, and point the learners at them.

    python rollout_engines.py nodes CONFIG [key=value ...]                 # how many rollout nodes
    python rollout_engines.py serve --hosts "node3 node4" CONFIG [...]     # one task on each rollout node
    python rollout_engines.py attach --hosts "node3 node4" CONFIG [...]    # on the batch node

Each distinct host of rollout.engines, in the order of first appearance, stands for one rollout node
of the job: with hosts [rollout-0, rollout-0, rollout-1] and rollout nodes "node3 node4", engines 0
and 1 run on node3 and engine 2 on node4, each with its own kind, tp and port (a config whose engines
are all on 127.0.0.1, like the quickstart, has one rollout node). An SGLang engine takes `tp` GPUs of
its node, the node's engines in order from GPU 0 (--base-gpu-id). Engines bind ROLLOUT_BIND_HOST
(default 0.0.0.0: the learners are on other nodes) and need the token in the environment variable
rollout.token_env, which the job script sets. Logs: <tracking.dir>/<tracking.run_name>/engines/.

`serve` starts this node's engines (SLURMD_NODENAME, else the host name, is looked up in --hosts)
and waits: SIGTERM or SIGINT stops them (exit 0); an engine that exits on its own stops the others
(exit 1, with the end of its log). `attach` waits until every engine answers /health_generate
(rollout.startup_timeout), then prints the learners' override with the nodes' names and launch false:

    rollout.engines=[{"kind": "cpu", "host": "node3", "port": 30123, "launch": false, ...}, ...]
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from megatron_rl.config import ConfigError, RunConfig, load_config
from megatron_rl.config.sections import EngineSpec


def engine_hosts(cfg: RunConfig) -> list[str]:
    """The distinct hosts of rollout.engines in the order they first appear: one rollout node each."""
    return list(dict.fromkeys(engine.host for engine in cfg.rollout.engines))


def placed_engines(cfg: RunConfig, nodes: list[str]) -> list[EngineSpec]:
    """rollout.engines with each host replaced by its rollout node and launch false (the job starts them)."""
    hosts = engine_hosts(cfg)
    if len(nodes) != len(hosts):
        raise ValueError(f"the job has {len(nodes)} rollout node(s) ({' '.join(nodes)}) but rollout.engines names "
                         f"{len(hosts)} host(s) ({' '.join(hosts)}): one rollout node per host")
    node_of = dict(zip(hosts, nodes, strict=True))
    return [engine.model_copy(update={"host": node_of[engine.host], "launch": False})
            for engine in cfg.rollout.engines]


def learner_override(engines: list[EngineSpec]) -> str:
    return "rollout.engines=" + json.dumps([engine.model_dump(mode="json") for engine in engines])


def attach(cfg: RunConfig, nodes: list[str]) -> str:
    """Wait until every engine generates; the learners' rollout.engines override."""
    from megatron_rl.rollout.protocol import EngineClient

    engines, token = placed_engines(cfg, nodes), _token(cfg)
    waiting = [EngineClient(f"http://{engine.host}:{engine.port}", token=token, timeout=10.0) for engine in engines]
    deadline = time.monotonic() + cfg.rollout.startup_timeout
    while waiting:
        waiting = [client for client in waiting if not client.health_generate()]
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"no answer to /health_generate within rollout.startup_timeout = "
                               f"{cfg.rollout.startup_timeout:.0f} s from {', '.join(c.url for c in waiting)}")
        time.sleep(0.5 if waiting else 0)
    return learner_override(engines)


def serve(cfg: RunConfig, nodes: list[str]) -> int:
    """Run this node's engines until SIGTERM / SIGINT (0) or until one of them exits (1)."""
    from megatron_rl.rollout.launcher import ServerProcess, cpu_server_command
    from megatron_rl.rollout.sglang import sglang_server_command

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if node not in nodes:
        raise ValueError(f"this node, {node}, is not one of the rollout nodes {' '.join(nodes)}")
    if cfg.model.hf_path is None:
        raise ValueError("model.hf_path must name the HF checkpoint the engines serve")
    token, bind = _token(cfg), os.environ.get("ROLLOUT_BIND_HOST", "0.0.0.0")
    log_dir = Path(cfg.tracking.dir) / (cfg.tracking.run_name or "") / "engines"
    processes, first_gpu = [], 0
    for index, engine in enumerate(placed_engines(cfg, nodes)):
        if engine.host != node:
            continue
        engine = engine.model_copy(update={"host": bind})
        if engine.kind == "cpu":
            command = cpu_server_command(engine, cfg.model.hf_path)
        else:
            command = [*sglang_server_command(engine, cfg.model.hf_path, token), "--base-gpu-id", str(first_gpu)]
            first_gpu += engine.tp
        processes.append(ServerProcess(command, token, log_dir / f"engine{index}.log"))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for process in processes:
            process.start()
        print(f"{node}: {len(processes)} engine(s) started, logs in {log_dir}", flush=True)
        while not stop.wait(1.0):
            for process in processes:
                if not process.alive():
                    print(f"{node}: an engine exited; end of {process.log_path}:\n{process.log_tail()}",
                          file=sys.stderr, flush=True)
                    return 1
        return 0
    finally:
        for process in processes:
            process.stop()


def _token(cfg: RunConfig) -> str:
    token = os.environ.get(cfg.rollout.token_env)
    if not token:
        raise ValueError(f"the environment variable {cfg.rollout.token_env} (rollout.token_env) must hold the "
                         "engines' token; the job script sets it")
    return token


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["nodes", "serve", "attach"])
    parser.add_argument("--hosts", default="", help="the job's rollout nodes, separated by spaces or commas")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    nodes = args.hosts.replace(",", " ").split()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "nodes":
            print(len(engine_hosts(cfg)))
            return 0
        if not nodes:
            raise ValueError(f"{args.command} needs --hosts: the job's rollout nodes")
        if args.command == "serve":
            return serve(cfg, nodes)
        print(attach(cfg, nodes))
        return 0
    except (ConfigError, ValueError, TimeoutError) as exc:
        print(f"rollout_engines.py {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

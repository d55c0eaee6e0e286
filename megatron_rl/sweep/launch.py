"""Launching one sweep run: torchrun over its config file, in its own process group, output to its log.

    config = with_free_engine_ports(config)        # before writing run_dir/config.yaml
    exit_code = launch_run(run_dir, world_size=2, on_step=print)

`launch_run` is the sweep's run function: `torchrun --standalone --nproc-per-node WORLD_SIZE -m megatron_rl.cli
train RUN_DIR/config.yaml` (rank 0 starts the rollout servers, as in any run), every line of output appended to
RUN_DIR/run.log. While it runs, the metrics file is polled and `on_step(rows)` called when a step is logged. On
KeyboardInterrupt or SIGTERM of the sweep, torchrun gets SIGTERM, which it passes to its workers (each in its
own session; the trainer stops its servers), and, if it has not exited after STOP_GRACE_SECONDS, SIGKILL.

Ports: the trainer refuses to launch an engine on a port something already listens on (it fails at once, it
does not hang), so a server left by a crashed run would fail every later run of the sweep. Each run therefore
gets free loopback ports for the engines it launches, chosen just before it starts and written into its config.
Another program may still take such a port before the engine binds it; `lost_port_race` recognises that
failure (no step logged, the trainer's "already listens" error in the log), and the sweep starts the run again
on other ports.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

from megatron_rl.config import RunConfig, config_from_dict
from megatron_rl.sweep.run_dir import RunDir

POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30.0


def with_free_engine_ports(config: RunConfig) -> RunConfig:
    """`config` with every launched engine (rollout.engines[i].launch: true) on a port free right now."""
    raw = config.model_dump(mode="json", by_alias=True)
    with ExitStack() as held:  # keep each port bound until all are chosen, so that no two engines share one
        for engine in raw["rollout"]["engines"]:
            if engine["launch"]:
                sock = held.enter_context(socket.socket())
                sock.bind((engine["host"], 0))
                engine["port"] = sock.getsockname()[1]
    return config_from_dict(raw)


PORT_TAKEN = "something already listens on"  # the trainer's EngineStartError for a busy engine port


def lost_port_race(run_dir: RunDir) -> bool:
    """Whether the run failed before its first step because an engine port was taken after it was chosen."""
    return run_dir.steps_logged() == 0 and PORT_TAKEN in run_dir.log_path.read_text(errors="replace")


def train_command(config_path: str | os.PathLike, world_size: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
            "-m", "megatron_rl.cli", "train", str(config_path)]


def launch_run(run_dir: RunDir, world_size: int, on_step: Callable[[int], None]) -> int:
    """Train run_dir/config.yaml on `world_size` ranks; the exit code of torchrun."""
    command = train_command(run_dir.config_path, world_size)
    with open(run_dir.log_path, "ab") as log:
        log.write(f"--- {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        steps = 0
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            steps = _report_new_steps(run_dir, steps, on_step)
        _report_new_steps(run_dir, steps, on_step)
        return process.returncode
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if process.poll() is None:
            _stop(process)


def _report_new_steps(run_dir: RunDir, reported: int, on_step: Callable[[int], None]) -> int:
    steps = run_dir.steps_logged()
    if steps != reported:
        on_step(steps)
    return steps


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun's process group (torchrun stops its workers), SIGKILL after STOP_GRACE_SECONDS."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

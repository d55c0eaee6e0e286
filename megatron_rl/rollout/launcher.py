"""Rollout engine processes: start, wait until they generate, stop.

An engine process is a command (`megatron-rl serve ...` on CPU, `python -m sglang.launch_server ...`
on GPU nodes) with its admin token in the environment (never on the command line, where `ps`
shows it) and its output in a log file, in a session of its own. A command that does not watch its
launcher itself (SGLang, sglang-router; `megatron-rl serve` does) runs under rollout/parent_watchdog.py, so
that it stops when the launcher dies, even by SIGKILL. `wait_until_ready` polls /health_generate and, if the
process dies first, fails with the end of its log.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_rl.config.sections import EngineSpec
from megatron_rl.rollout.cpu_server import TOKEN_ENV
from megatron_rl.rollout.parent_watchdog import PARENT_ENV, watched
from megatron_rl.rollout.protocol import EngineClient


class EngineStartError(RuntimeError):
    """An engine process exited or did not answer in time; the message has the end of its log."""


def cpu_server_command(spec: EngineSpec, model_path: str) -> list[str]:
    """`megatron-rl serve` for an EngineSpec of kind 'cpu' (floats as repr: they reach the server unrounded)."""
    return [sys.executable, "-m", "megatron_rl.cli", "serve", "--model-path", model_path, "--host", spec.host,
            "--port", str(spec.port), "--max-batch-size", str(spec.max_batch_size), "--threads", str(spec.threads),
            "--dtype", spec.dtype, "--logit-noise-std", repr(spec.logit_noise_std),
            "--logit-noise-seed", str(spec.logit_noise_seed)]


class ServerProcess:
    """One engine process; its stdout and stderr go to `log_path` (appended across restarts). watches_parent:
    the command stops by itself when this process is gone; otherwise it runs under the parent watchdog."""

    def __init__(self, command: list[str], token: str, log_path: str | Path, watches_parent: bool = False):
        self.command = command if watches_parent else watched(command)
        self.token, self.log_path = token, Path(log_path)
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TOKEN_ENV: self.token, PARENT_ENV: str(os.getpid())}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.command)}\n".encode())
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to its whole process group (a server's own children too) after `timeout` s."""
        if not self.alive():
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)  # its own session: the group id is its pid
            self._process.wait()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_until_ready(self, client: EngineClient, timeout: float) -> None:
        """Poll /health_generate until it succeeds; EngineStartError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineStartError(f"engine {client.url} exited with code {self._process.returncode} "
                                       f"before it was ready; end of {self.log_path}:\n{self.log_tail()}")
            if client.health_generate():
                return
            time.sleep(0.25)
        raise EngineStartError(f"engine {client.url} did not answer /health_generate within {timeout:.0f} s "
                               f"(rollout.startup_timeout); end of {self.log_path}:\n{self.log_tail()}")


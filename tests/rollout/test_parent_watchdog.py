"""The parent watchdog: a launched server that does not watch its launcher (SGLang, sglang-router) stops with
everything it started when the launcher dies by SIGKILL; SIGTERM reaches it and its exit code comes back; a
server that ignores SIGTERM is SIGKILLed with its whole process group by ServerProcess.stop."""

import os
import subprocess
import sys
import time

import pytest

from megatron_rl.rollout.launcher import ServerProcess
from megatron_rl.rollout.parent_watchdog import EXIT_USAGE, PARENT_ENV, watched

SERVER = """
import pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, {on_sigterm})
grandchild = subprocess.Popen(["sleep", "1000"])
pathlib.Path(sys.argv[1]).write_text(f"{{__import__('os').getpid()}} {{grandchild.pid}}")
time.sleep(1000)
"""


def server_command(pid_file, on_sigterm: str = "lambda *_: sys.exit(7)") -> list[str]:
    """A stand-in server: starts a grandchild, writes 'its pid, the grandchild's pid' to pid_file, sleeps."""
    return [sys.executable, "-c", SERVER.format(on_sigterm=on_sigterm), str(pid_file)]


def read_pids(pid_file, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text():
            return [int(pid) for pid in pid_file.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"the stand-in server did not write {pid_file}")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_the_server_and_its_children_stop_when_the_launcher_is_killed(tmp_path):
    pid_file = tmp_path / "pids"
    launcher = (
        "import sys\n"
        "from megatron_rl.rollout.launcher import ServerProcess\n"
        f"process = ServerProcess({server_command(pid_file)!r}, 't', {str(tmp_path / 'server.log')!r})\n"
        "process.start()\n"
        "print(process.pid, flush=True)\n"
        "sys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    watchdog = int(parent.stdout.readline())
    server, grandchild = read_pids(pid_file)
    assert not gone(server, 0.5) and not gone(grandchild, 0.1)  # negative control: all run while the launcher does
    parent.kill()
    parent.wait()
    for pid in (watchdog, server, grandchild):
        assert gone(pid, 20), f"process {pid} outlived its launcher"


def test_sigterm_reaches_the_server_and_its_exit_code_comes_back(tmp_path):
    process = ServerProcess(server_command(tmp_path / "pids"), "t", tmp_path / "server.log")
    process.start()
    server, grandchild = read_pids(tmp_path / "pids")
    process.stop(timeout=30)
    assert process._process.returncode == 7 and gone(server, 5)
    os.kill(grandchild, 9)  # the stand-in exits without stopping it, as a real server's own shutdown would


def test_stop_kills_the_whole_group_of_a_server_that_ignores_sigterm(tmp_path):
    process = ServerProcess(server_command(tmp_path / "pids", on_sigterm="signal.SIG_IGN"), "t",
                            tmp_path / "server.log", watches_parent=True)  # not wrapped: the server itself
    process.start()
    server, grandchild = read_pids(tmp_path / "pids")
    started = time.monotonic()
    process.stop(timeout=1)
    assert time.monotonic() - started < 10
    assert gone(server, 5) and gone(grandchild, 5)


@pytest.mark.parametrize(("argv", "parent", "message"), [
    (["sleep", "1"], "self", "usage: python -m megatron_rl.rollout.parent_watchdog -- COMMAND"),
    (["--", "sleep", "1"], None, f"{PARENT_ENV} must hold the launcher's process id, got ''"),
    (["--", "sleep", "1"], "1", f"process 1 ({PARENT_ENV}) is not this process's parent"),
])
def test_usage_errors_exit_2_and_say_what_is_wrong(argv, parent, message):
    env = {key: value for key, value in os.environ.items() if key != PARENT_ENV}
    if parent is not None:
        env[PARENT_ENV] = str(os.getpid()) if parent == "self" else parent
    result = subprocess.run(watched(["x"])[:3] + argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE and message in result.stderr

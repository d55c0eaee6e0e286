"""Run a server command that must not outlive the process that launched it.

    python -m megatron_rl.rollout.parent_watchdog -- python -m sglang.launch_server ...

`megatron-rl serve` watches its launcher itself (PARENT_ENV). SGLang servers and sglang-router do not: if the
trainer is SIGKILLed (out of memory, scancel --signal=KILL, a crash in native code), they would go on holding
their port and their GPU memory. The launcher therefore starts them under this watchdog, which

- starts the command as its child, in its own process group (the launcher gave it a new session);
- passes SIGTERM and SIGINT on to the child, and exits with the child's exit code (128 + N for signal N);
- once a second checks that PARENT_ENV's process is still its parent; when it is gone, sends SIGTERM to the
  whole process group (the server and everything it started), then SIGKILL to what is left once the server has
  exited or after GRACE_SECONDS.
"""

import os
import signal
import subprocess
import sys

PARENT_ENV = "MEGATRON_RL_SERVE_PARENT_PID"  # set by the launcher: stop serving when that process is gone
CHECK_SECONDS = 1.0
GRACE_SECONDS = 10.0
EXIT_USAGE = 2


def watched(command: list[str]) -> list[str]:
    """`command` run under this watchdog."""
    return [sys.executable, "-m", "megatron_rl.rollout.parent_watchdog", "--", *command]


def parent_alive(parent_pid: int) -> bool:
    """Whether the launcher is still this process's parent (a dead parent's children are re-parented)."""
    return os.getppid() == parent_pid


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m megatron_rl.rollout.parent_watchdog -- COMMAND [ARG ...]", file=sys.stderr)
        return EXIT_USAGE
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        print(f"parent_watchdog: {PARENT_ENV} must hold the launcher's process id, got {parent!r}", file=sys.stderr)
        return EXIT_USAGE
    if not parent_alive(int(parent)):
        print(f"parent_watchdog: process {parent} ({PARENT_ENV}) is not this process's parent", file=sys.stderr)
        return EXIT_USAGE
    child = subprocess.Popen(argv[1:])
    for forwarded in (signal.SIGTERM, signal.SIGINT):
        signal.signal(forwarded, lambda signum, _frame: child.send_signal(signum))
    while True:
        try:
            code = child.wait(timeout=CHECK_SECONDS)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        if not parent_alive(int(parent)):
            stop_group(child)
            return 128 + signal.SIGTERM


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the process group (this process ignores it), then, once the child has exited or GRACE_SECONDS
    have passed, SIGKILL to whatever is left of the group, this process included."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgid(0), signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(os.getpgid(0), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

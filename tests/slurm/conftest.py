"""A real Slurm 22.05 cluster of three nodes on this machine, for the tests of launch/slurm (marker `slurm`).

`slurm_cluster` (session): runs tests/slurm/cluster/start.sh, which installs Debian's slurm and munge
packages with apt-get when they are missing, and yields the environment with SLURM_CONF set. At the
end, also after a failure, Ctrl-C or SIGTERM, cluster/stop.sh stops every daemon by its PID file and
removes the network namespaces, the bridge and the /etc/hosts lines. The nodes are node1..node3, each
its own network and UTS namespace (see start.sh). A heterogeneous job's components never share a node,
so learners on two nodes plus a rollout node need three.

Skipped, with the reason, only where such a cluster cannot run: not root, neither Slurm nor apt-get,
no network namespaces. One cluster per machine at a time (its ports, bridge and subnet are fixed):
a second session waits for the first one's lock.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster"
RUNDIR = Path("/tmp/megatron-rl-slurm")
LOCK = Path("/tmp/megatron-rl-slurm.lock")
NODES = 3
LOCK_TIMEOUT = 1800  # seconds to wait for another session's cluster
START_TIMEOUT = 900  # includes apt-get install on a fresh machine
STOP_TIMEOUT = 180


def cannot_run() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: it starts munged and slurmd, edits /etc/hosts and creates network namespaces"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    if shutil.which("unshare") is None:
        return "no unshare (util-linux) to create the nodes' namespaces"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"network / UTS namespaces are not available here: {probe.stderr.strip()}"
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = cannot_run()
    if reason:
        pytest.skip(f"Slurm tests: {reason}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # so that `finally` stops the daemons
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another session has held {LOCK} (its Slurm test cluster) for {LOCK_TIMEOUT} s")
                time.sleep(1.0)
        try:
            start = time.monotonic()
            started = subprocess.run([CLUSTER / "start.sh", RUNDIR, str(NODES)], capture_output=True, text=True,
                                     timeout=START_TIMEOUT)
            if started.returncode != 0:
                pytest.fail(f"start.sh failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
            print(f"Slurm test cluster up in {time.monotonic() - start:.1f} s")
            yield {**os.environ, "SLURM_CONF": str(RUNDIR / "slurm.conf")}
        finally:
            subprocess.run([CLUSTER / "stop.sh", RUNDIR], capture_output=True, timeout=STOP_TIMEOUT)
            signal.signal(signal.SIGTERM, previous)

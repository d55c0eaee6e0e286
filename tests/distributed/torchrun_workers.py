"""Run a worker script under `torchrun --standalone` from a test; a failure shows the worker's stderr."""

import subprocess
import sys
from pathlib import Path


def run_worker(worker: Path, nproc: int, *args: str, timeout: float = 1200) -> str:
    """`torchrun --nproc_per_node=nproc worker *args`; asserts it exits 0 and returns its stdout."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(worker), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout

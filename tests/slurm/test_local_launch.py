"""launch/local.sh on this machine: the quickstart stopped by SIGUSR1 after a checkpoint, then resumed to the end.

The script derives the number of learner processes from parallel.world_size (2) and passes SIGUSR1 to
torchrun's rank 0 only; the learners save a checkpoint after the step in progress and exit with 138 (torchrun
reports that as a failure and exits 1). The second run resumes from that checkpoint (checkpoint.resume=auto):
every step is logged exactly once.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.ports import free_port
from megatron_rl.tracking import read_metrics_jsonl

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
RUN_TIMEOUT = 600


def local_sh(tmp: Path, log: Path) -> subprocess.Popen:
    overrides = [f"model.hf_path={tmp / 'task' / 'model'}", f"data.train_path={tmp / 'task' / 'train.jsonl'}",
                 f"data.train_steps={STEPS}", "data.rollout_batch_size=8", f"tracking.dir={tmp / 'runs'}",
                 f"checkpoint.dir={tmp / 'checkpoints'}", "checkpoint.save_interval=0", "checkpoint.resume=auto",
                 f"rollout.engines=[{{kind: cpu, port: {free_port()}}}]"]
    with open(log, "w") as output:
        return subprocess.Popen([ROOT / "launch" / "local.sh", ROOT / "configs" / "quickstart.yaml", *overrides],
                                cwd=tmp, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"local.sh ran longer than {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def test_sigusr1_checkpoints_and_a_second_run_resumes(tmp_path):
    subprocess.run([sys.executable, "-m", "megatron_rl.cli", "toy-task", str(tmp_path / "task"), "--prompts", "200"],
                   check=True, capture_output=True, timeout=300)
    metrics = tmp_path / "runs" / "quickstart" / "metrics.jsonl"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    first = local_sh(tmp_path, first_log)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 1):
        assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()[-4000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)
    assert finish(first, first_log) == 1, first_log.read_text()[-4000:]
    stopped_at = int((tmp_path / "checkpoints" / "latest").read_text())
    assert 1 <= stopped_at < STEPS  # checkpoint.save_interval=0: only the stop saved one
    output = first_log.read_text()
    assert f"SIGUSR1: stopped after step {stopped_at}, its checkpoint is saved" in output
    assert "exitcode  : 138" in output  # torchrun's report (the worker exiting last may be stopped by torchrun)
    assert [row["step"] for row in read_metrics_jsonl(metrics)] == list(range(1, stopped_at + 1))

    second = local_sh(tmp_path, second_log)
    assert finish(second, second_log) == 0, second_log.read_text()[-4000:]
    assert f"at step {stopped_at} (weight version {stopped_at})" in second_log.read_text()
    assert [row["step"] for row in read_metrics_jsonl(metrics)] == list(range(1, STEPS + 1))
    assert int((tmp_path / "checkpoints" / "latest").read_text()) == stopped_at  # save_interval 0: no other save

"""The real launch scripts on a real Slurm cluster: the quickstart as a heterogeneous job, preempted and requeued.

One job of configs/quickstart.yaml (the toy task, STEPS steps, a checkpoint every SAVE_INTERVAL) is submitted
with launch/slurm/submit.sh: learner ranks 0 and 1 on node1 and node2 (gloo across the nodes), the CPU
rollout server (`megatron-rl serve`) on node3, the rollout node. It runs three times:

1. Slurm requeues it mid-run (`scontrol requeue`: SIGTERM to every process, the preemption path) once step
   SAVE_INTERVAL + 1 is logged; the next run resumes from the newest checkpoint and cuts the metrics rows
   that the killed run wrote after it;
2. right after that resume, the batch script gets SIGUSR1 (as Slurm sends it before the time limit,
   --signal=B:USR1); it passes the signal to learner rank 0, the learners save a checkpoint after the step
   in progress, exit 138, and the script requeues the job;
3. the third run resumes from that checkpoint and finishes.

What it shows: every step exactly once in the metrics, weights pushed to the remote engine and verified
after every step, the checkpoints and resumes, and a rising reward: in its first STEPS steps the quickstart's
reward goes from ~0.06 (mean of the first 10 steps) to ~0.2 (of the last 10), measured on one machine (it
reaches 0.7 after ~100 steps).

A requeued job may start again once the cluster's credential lifetime has passed (cred_expire: 15 s here,
Slurm's default 120 s). Slurm 22.05 then leaves a heterogeneous job pending (reason None) until some periodic
pass, about 100 s later (measured); any update of the job starts it at once, so the test sends one
(`scontrol update StartTime=now`) when the job is eligible.
"""

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from megatron_rl.tracking import read_metrics_jsonl
from megatron_rl.wandb_reader import read_wandb_run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
STEPS = 50
SAVE_INTERVAL = 3
START_TIMEOUT = 600  # one run up to its prompts being loaded: imports, server start, model build on 2 busy cores
STEPS_TIMEOUT = 240  # then its first SAVE_INTERVAL + 1 steps (about 0.5 s each; the first weight push included)
CALL_TIMEOUT = 60  # one Slurm client call


def slurm(env: dict, *args: str) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CALL_TIMEOUT)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


@dataclass
class Job:
    env: dict
    id: str
    output_path: Path
    metrics_path: Path
    checkpoint_dir: Path

    def field(self, name: str) -> str:
        """A field of the job (its first component) as `scontrol show job` prints it."""
        line = slurm(self.env, "scontrol", "-o", "show", "job", self.id).splitlines()[0]
        return dict(item.split("=", 1) for item in line.split() if "=" in item)[name]

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def rows(self) -> int:
        return self.metrics_path.read_bytes().count(b"\n") if self.metrics_path.exists() else 0

    def latest(self) -> int:
        return int((self.checkpoint_dir / "latest").read_text())

    def wait(self, what: str, done, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            state = self.field("JobState")
            ended = state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
            if ended and done():  # it ended since done() was asked (COMPLETING -> COMPLETED)
                return
            if time.monotonic() > deadline or ended:
                what_failed = "did not happen before the job ended" if ended else f"did not happen in {timeout:.0f} s"
                pytest.fail(f"job {self.id} ({state}): {what} {what_failed}; end of its output:\n"
                            f"{self.output()[-6000:]}")
            time.sleep(0.2)

    def wait_restarted(self, restarts: int) -> None:
        """Until the job runs again after its restarts-th requeue (rl.sbatch's first line). Slurm starts it once
        the last run's processes are gone; this run has not touched the metrics or checkpoints yet."""
        self.wait(f"requeue {restarts}", lambda: self.field("Restarts") == str(restarts)
                  and self.field("JobState") == "PENDING", timeout=120)
        eligible = datetime.fromisoformat(self.field("EligibleTime"))
        self.wait("eligibility", lambda: datetime.now() > eligible, timeout=180)
        slurm(self.env, "scontrol", "update", f"JobId={self.id}", "StartTime=now")  # see the module docstring
        self.wait(f"run {restarts + 1}", lambda: re.search(rf"^job \d+ restart {restarts}: ", self.output(),
                                                           flags=re.MULTILINE) is not None, timeout=180)


@dataclass
class Observed:
    job: Job
    rows_at_kill: int
    latest_at_kill: int
    latest_at_stop: int
    rows_at_stop: int
    final_state: str
    exit_code: str
    output: str


@pytest.fixture(scope="module")
def requeued_job(slurm_cluster, tmp_path_factory) -> Observed:
    tmp = tmp_path_factory.mktemp("slurm_rl")
    subprocess.run([sys.executable, "-m", "megatron_rl.cli", "toy-task", str(tmp / "task"), "--prompts", "200"],
                   check=True, capture_output=True, timeout=300)
    overrides = [f"model.hf_path={tmp / 'task' / 'model'}", f"data.train_path={tmp / 'task' / 'train.jsonl'}",
                 f"data.train_steps={STEPS}", f"tracking.dir={tmp / 'runs'}",
                 f"checkpoint.dir={tmp / 'checkpoints'}", f"checkpoint.save_interval={SAVE_INTERVAL}",
                 "checkpoint.keep_last=null", "rollout.startup_timeout=300", "rollout.request_timeout=120"]
    env = {**slurm_cluster, "PYTHON": sys.executable, "LEARNER_NODES": "2", "TIME_LIMIT": "30",
           "JOB_OUTPUT": str(tmp / "job-%j.out"), "OMP_NUM_THREADS": "1"}
    submitted = subprocess.run([ROOT / "launch" / "slurm" / "submit.sh", ROOT / "configs" / "quickstart.yaml",
                                *overrides], env=env, cwd=tmp, capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    job = Job(env, job_id, tmp / f"job-{job_id}.out", tmp / "runs" / "quickstart" / "metrics.jsonl",
              tmp / "checkpoints")
    try:
        job.wait("the start of the first run", lambda: "kept 200 of 200 rows" in job.output())
        job.wait(f"step {SAVE_INTERVAL + 1} of the first run", lambda: job.rows() > SAVE_INTERVAL, STEPS_TIMEOUT)
        slurm(env, "scontrol", "requeue", job_id)
        job.wait_restarted(1)
        rows_at_kill, latest_at_kill = job.rows(), job.latest()

        job.wait("the resume of the second run", lambda: "resumed from" in runs_of(job.output())[-1])
        slurm(env, "scancel", "--signal=USR1", "--batch", job_id)
        job.wait_restarted(2)
        latest_at_stop, rows_at_stop = job.latest(), job.rows()

        job.wait("the end of the third run", lambda: job.field("JobState") == "COMPLETED")
        return Observed(job, rows_at_kill, latest_at_kill, latest_at_stop, rows_at_stop, job.field("JobState"),
                        job.field("ExitCode"), job.output())
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=CALL_TIMEOUT)


def runs_of(output: str) -> list[str]:
    """The job's output of each run, from after the `job ID restart N: ` that rl.sbatch prints first."""
    return re.split(r"^job \d+ restart \d+: ", output, flags=re.MULTILINE)[1:]


def test_the_job_ends_with_every_step_logged_once(requeued_job):
    assert (requeued_job.final_state, requeued_job.exit_code) == ("COMPLETED", "0:0")
    assert requeued_job.job.field("Restarts") == "2"
    rows = read_metrics_jsonl(requeued_job.job.metrics_path)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for step, row in enumerate(rows, start=1):
        assert 0.0 <= row["rollout/reward_mean"] <= 1.0 and row["rollout/reward_errors"] == 0.0
        assert row["rollout/groups"] == 32.0  # data.rollout_batch_size prompts, 8 samples each
        assert row["sync/version"] == float(step)  # pushed to the engine on node3 and read back (checksum)
        assert row["train/skipped"] == 0.0
    assert requeued_job.job.latest() == STEPS


def test_the_reward_rises(requeued_job):
    rewards = [row["rollout/reward_mean"] for row in read_metrics_jsonl(requeued_job.job.metrics_path)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 2 * first and last - first >= 0.05, f"mean reward {first:.3f} (first 10 steps) -> {last:.3f}"


def test_learners_on_two_nodes_engine_on_the_rollout_node(requeued_job):
    runs = runs_of(requeued_job.output)
    assert len(runs) == 3
    for run in runs:
        assert run.startswith("learners node1 node2 (MASTER_ADDR node1:"), run[:200]
        assert "rollout nodes node3" in run.splitlines()[0]
        assert "node3: 1 engine(s) started" in run
    engine_log = (requeued_job.job.metrics_path.parent / "engines" / "engine0.log").read_text()
    assert engine_log.count("--- start:") == 3 and "--host 0.0.0.0" in engine_log
    assert "joined weight-update group" in engine_log


def test_slurm_requeue_resumes_from_the_newest_checkpoint(requeued_job):
    killed_at, resumed_at = requeued_job.rows_at_kill, requeued_job.latest_at_kill
    assert killed_at > SAVE_INTERVAL and resumed_at % SAVE_INTERVAL == 0 and resumed_at <= killed_at
    first, second, _ = runs_of(requeued_job.output)
    assert "SIGTERM: the job is being cancelled or requeued" in first
    assert f"resumed from {requeued_job.job.checkpoint_dir} at step {resumed_at} " in second
    dropped = killed_at - resumed_at  # rows the killed run logged after its last checkpoint
    assert (f"dropped {dropped} row(s) of steps after {resumed_at}" in second) == (dropped > 0)


def test_sigusr1_saves_a_checkpoint_and_requeues(requeued_job):
    stopped_at = requeued_job.latest_at_stop  # the step in progress when the signal came (or the next one)
    assert requeued_job.latest_at_kill < stopped_at < STEPS and requeued_job.rows_at_stop == stopped_at
    _, second, third = runs_of(requeued_job.output)
    assert "SIGUSR1: learner rank 0 (pid " in second
    assert f"SIGUSR1: stopped after step {stopped_at}, its checkpoint is saved" in second
    assert f"requeueing job {requeued_job.job.id}" in second
    assert f"resumed from {requeued_job.job.checkpoint_dir} at step {stopped_at} " in third
    assert "dropped" not in third


def test_wandb_runs_of_the_stopped_and_the_last_run(requeued_job):
    wandb_dir = requeued_job.job.metrics_path.parent / "wandb"
    runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 3
    stopped, last = read_wandb_run(runs[1]), read_wandb_run(runs[2])
    resumed_at, stopped_at = requeued_job.latest_at_kill, requeued_job.latest_at_stop
    assert [h["_step"] for h in stopped.history] == list(range(resumed_at + 1, stopped_at + 1))
    assert [h["_step"] for h in last.history] == list(range(stopped_at + 1, STEPS + 1))
    assert last.exit_code == 0

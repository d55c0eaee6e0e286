"""End to end: `megatron-rl sweep` over the quickstart config, 2 grid points x 1 seed, 2 steps each.

Each run is a real torchrun of two gloo learner ranks with its own `megatron-rl serve`. Checks what the sweep
leaves behind (the run directories with their resolved config, metrics, wandb offline run and logs; sweep.json;
the two PNGs and the markdown report), and that the same command run again reruns nothing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from megatron_rl.config import load_config
from megatron_rl.data.toy_task import write_toy_task
from megatron_rl.tracking import read_metrics_jsonl
from megatron_rl.wandb_reader import read_wandb_run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
RUNS = ("algorithm.loss=kpo__seed=0", "algorithm.loss=vespo__seed=0")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep(tmp: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_rl.cli", "sweep", str(ROOT / "configs" / "quickstart.yaml"),
               "--grid", "algorithm.loss=kpo,vespo", "--seeds", "1", "--out", "out",
               f"model.hf_path={tmp / 'task' / 'model'}", f"data.train_path={tmp / 'task' / 'train.jsonl'}",
               f"data.train_steps={STEPS}", "checkpoint.save_interval=0"]
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    write_toy_task(tmp / "task", num_prompts=200)
    first = sweep(tmp)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return tmp, first


def test_each_run_has_its_config_metrics_wandb_run_and_logs(swept):
    tmp, result = swept
    for name, loss in zip(RUNS, ("kpo", "vespo"), strict=True):
        run_dir = tmp / "out" / name
        config = load_config(run_dir / "config.yaml")
        assert (config.algorithm.loss, config.data.seed, config.data.train_steps) == (loss, 0, STEPS)
        rows = read_metrics_jsonl(run_dir / "metrics.jsonl")
        assert [row["step"] for row in rows] == [1, 2]
        assert all(0.0 <= row["rollout/reward_mean"] <= 1.0 for row in rows)
        history = read_wandb_run(run_dir / "wandb").history
        assert [h["_step"] for h in history] == [1, 2]
        assert [h["rollout/reward_mean"] for h in history] == [row["rollout/reward_mean"] for row in rows]
        assert "step 2/2" in (run_dir / "run.log").read_text()
        assert "--- start:" in (run_dir / "engines" / "engine0.log").read_text()
        assert (run_dir / "finished.json").exists()
        assert f"run {RUNS.index(name) + 1}/2 {name}: step 2/2" in result.stdout
    servers = subprocess.run(["pgrep", "-f", f"--model-path {tmp / 'task' / 'model'}"], capture_output=True, text=True)
    assert servers.stdout.strip() == ""


def test_summary_and_report(swept):
    tmp, _ = swept
    summary = json.loads((tmp / "out" / "sweep.json").read_text())
    assert summary["grid"] == {"algorithm.loss": ["kpo", "vespo"]} and summary["seeds"] == [0]
    for run, name in zip(summary["runs"], RUNS, strict=True):
        rewards = [row["rollout/reward_mean"] for row in read_metrics_jsonl(tmp / "out" / name / "metrics.jsonl")]
        assert (run["name"], run["status"], run["exit_code"], run["steps"]) == (name, "finished", 0, STEPS)
        assert run["reward_final"] == rewards[-1] and run["reward_last_10pct"] == rewards[-1]  # ceil(0.2) = 1 step
        assert run["wall_seconds"] > 0
    for png in ("reward_curves.png", "final_reward.png"):
        assert (tmp / "out" / png).read_bytes().startswith(PNG_SIGNATURE)
        assert imread(tmp / "out" / png).shape[:2] == (440, 770)
    report = (tmp / "out" / "report.md").read_text()
    assert f"```bash\n{summary['command']}\n```" in report and "--grid algorithm.loss=kpo,vespo" in report
    assert "![reward curves](reward_curves.png)" in report and "- seeds (data.seed): 0\n" in report


def test_the_same_command_again_reruns_nothing(swept):
    tmp, _ = swept
    markers = {name: (tmp / "out" / name / "finished.json").stat().st_mtime_ns for name in RUNS}
    again = sweep(tmp)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "started" not in again.stdout
    for index, name in enumerate(RUNS, start=1):
        assert f"run {index}/2 {name}: finished before, skipped" in again.stdout
        assert (tmp / "out" / name / "finished.json").stat().st_mtime_ns == markers[name]
    assert "sweep: 2 of 2 runs finished (2 finished before); 0 failed" in again.stdout

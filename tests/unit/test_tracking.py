"""Tracker: real wandb offline runs read back from their files, the JSONL file byte for byte, the
console output, and every refusal (bad names, values and steps) leaving the files untouched."""

import json
import math
import os
import pty
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_rl.config.sections import TrackingConfig
from megatron_rl.tracking import Tracker, read_metrics_jsonl
from megatron_rl.wandb_reader import find_run_file, iter_records, read_wandb_run

RUN_CONFIG = {
    "model": {"num_layers": 2, "hidden_size": 64, "hf_path": None},
    "rollout": {"engines": [{"kind": "cpu", "port": 30000}], "async": False},
    "optimizer": {"lr": 1e-06},
    "notes": "n" * 40_000,  # longer than a 32 KiB block: its record is split into FIRST / LAST chunks
}
# (step, what is logged, what is recorded): a float32 tensor is recorded as its exact float value.
STEPS = [
    (1, {"rollout/reward_mean": 0.25, "train/loss": torch.tensor(0.1), "perf/step_seconds": 3,
         "train/kl/k1": np.float64(1 / 3), "mismatch/tis_clipfrac": np.float32(0.5), "sync/bytes": 2**40},
     {"rollout/reward_mean": 0.25, "train/loss": 0.10000000149011612, "perf/step_seconds": 3,
      "train/kl/k1": 1 / 3, "mismatch/tis_clipfrac": 0.5, "sync/bytes": 2**40}),
    (2, {"train/loss": -0.0, "train/grad_norm": 1e-300}, {"train/loss": -0.0, "train/grad_norm": 1e-300}),
    (5, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "rollout/reward_mean": -math.inf},
     {"train/loss": math.nan, "train/grad_norm": math.inf, "rollout/reward_mean": -math.inf}),
]


def same(a: dict, b: dict, *, types: bool = True) -> bool:
    """Equal keys and values, NaN equal to NaN, and (with `types`) an int stays an int: wandb does not keep
    that apart (it writes 2.0 as 2 and -0.0 as -0, which read back as ints)."""
    return a.keys() == b.keys() and all(
        (not types or type(a[k]) is type(b[k])) and (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))
        for k in a)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One real offline run (wandb init takes about 0.5 s): metrics.jsonl and a wandb run file."""
    run_dir = tmp_path_factory.mktemp("offline")
    config = TrackingConfig(wandb_mode="offline", wandb_project="tracking-test", run_name="tiny",
                            jsonl_path="logs/metrics.jsonl")
    before = time.time()
    with Tracker(config, RUN_CONFIG, total_steps=5, run_dir=run_dir) as tracker:
        for step, logged, _ in STEPS:
            tracker.log(step, logged)
        wandb_dir = tracker.wandb_dir
    return run_dir, wandb_dir, before, time.time()


def test_offline_run_reads_back_the_logged_names_values_and_config(offline_run):
    run_dir, wandb_dir, _, _ = offline_run
    run = read_wandb_run(run_dir)
    assert run.path.parent == wandb_dir and wandb_dir.parent == run_dir / "wandb"
    assert (run.project, run.name, run.exit_code) == ("tracking-test", "tiny", 0)
    assert run.config == RUN_CONFIG
    assert [row["_step"] for row in run.history] == [step for step, _, _ in STEPS]
    for row, (_, _, recorded) in zip(run.history, STEPS, strict=True):
        assert same({k: v for k, v in row.items() if not k.startswith("_")}, recorded, types=False), row


def test_jsonl_holds_one_exact_strict_json_line_per_log_call(offline_run):
    run_dir, _, before, after = offline_run
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(STEPS)
    times = []
    for line, (step, _, recorded) in zip(lines, STEPS, strict=True):
        stamp = json.loads(line)["time"]
        times.append(stamp)
        finite = {k: (v if math.isfinite(v) else None) for k, v in recorded.items()}
        nonfinite = {k: {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan") for k, v in recorded.items()
                     if not math.isfinite(v)}
        expected = {"step": step, "time": stamp, **finite, **({"nonfinite": nonfinite} if nonfinite else {})}
        assert line == json.dumps(expected)
        assert "NaN" not in line and "Infinity" not in line  # strict JSON
    assert before <= times[0] <= times[1] <= times[2] <= after
    rows = read_metrics_jsonl(run_dir / "logs" / "metrics.jsonl")
    for row, (step, _, recorded) in zip(rows, STEPS, strict=True):
        assert same(row, {"step": step, "time": row["time"], **recorded})


def test_reader_checks_crcs_and_refuses_truncated_or_ambiguous_runs(offline_run, tmp_path):
    run_dir, _, _, _ = offline_run
    data = find_run_file(run_dir).read_bytes()
    kinds = [record.WhichOneof("record_type") for record in iter_records(find_run_file(run_dir))]
    assert kinds[:2] == ["header", "run"] and kinds.count("history") == len(STEPS) and kinds[-1] == "exit"
    corrupt = tmp_path / "corrupt" / "run-x.wandb"
    corrupt.parent.mkdir()
    corrupt.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    with pytest.raises(ValueError, match="CRC mismatch"):
        read_wandb_run(corrupt)
    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(data[:40_000])  # inside the run record, which spans two blocks
    with pytest.raises(ValueError, match="runs past its block or the file"):
        read_wandb_run(truncated)
    not_wandb = tmp_path / "not.wandb"
    not_wandb.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not a wandb run file"):
        read_wandb_run(not_wandb)
    shutil.copy(corrupt, tmp_path / "run-y.wandb")
    with pytest.raises(FileNotFoundError, match="exactly one run-\\*.wandb file .* found 2"):
        read_wandb_run(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found 0"):
        read_wandb_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no wandb run file or directory at"):
        read_wandb_run(tmp_path / "missing")


def test_disabled_wandb_writes_only_the_jsonl_and_prints_one_line_per_step(tmp_path, capsys):
    config = TrackingConfig(wandb_mode="disabled", jsonl_path=str(tmp_path / "abs" / "m.jsonl"))
    with Tracker(config, RUN_CONFIG, total_steps=10, run_dir=tmp_path / "run") as tracker:
        assert tracker.wandb_dir is None
        tracker.log(1, {"train/loss": 0.5, "perf/step_seconds": 12.345678, "rollout/reward_mean": 0.75,
                        "train/grad_norm": 2.0})
        tracker.console("checkpoint saved")
        tracker.log(2, {"train/grad_norm": 1.0})
    with pytest.raises(RuntimeError, match="log\\(step=3\\) after finish"):
        tracker.log(3, {"train/loss": 0.5})
    assert capsys.readouterr().out == ("step 1/10  rollout/reward_mean 0.75  train/loss 0.5  perf/step_seconds 12.35\n"
                                       "checkpoint saved\n"
                                       "step 2/10\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["abs", "abs/m.jsonl", "run"]
    assert [{k: v for k, v in row.items() if k != "time"} for row in read_metrics_jsonl(tmp_path / "abs/m.jsonl")] == [
        {"step": 1, "train/loss": 0.5, "perf/step_seconds": 12.345678, "rollout/reward_mean": 0.75,
         "train/grad_norm": 2.0},
        {"step": 2, "train/grad_norm": 1.0}]


@pytest.mark.parametrize(("step", "metrics", "message"), [
    (3, {"train/loss": 1.0, "reward": 1.0}, "metric 'reward' must be a name starting with one of rollout/, train/"),
    (3, {"train/": 1.0}, "metric 'train/' must be a name"),
    (3, {"Train/loss": 1.0}, "metric 'Train/loss' must be a name"),
    (3, {("train/loss",): 1.0}, "metric \\('train/loss',\\) must be a name"),
    (3, {"train/loss": "0.5"}, "metric 'train/loss' must be an int, a float or a 0-dim tensor, got str '0.5'"),
    (3, {"train/loss": True}, "metric 'train/loss' must be .* got bool True"),
    (3, {"train/loss": torch.tensor([0.5])}, "metric 'train/loss' must be .* got Tensor of shape \\(1,\\)"),
    (3, {"train/loss": np.zeros(2)}, "metric 'train/loss' must be .* got ndarray of shape \\(2,\\)"),
    (3, {"train/loss": None}, "metric 'train/loss' must be .* got NoneType None"),
    (2, {"train/loss": 1.0}, "step must increase from one log call to the next: got 2 after 2"),
    (1, {"train/loss": 1.0}, "got 1 after 2"),
    (-1, {"train/loss": 1.0}, "step must be an int >= 0, got -1"),
    (3.0, {"train/loss": 1.0}, "step must be an int >= 0, got 3.0"),
])
def test_bad_names_values_and_steps_are_refused_before_anything_is_written(tmp_path, capsys, step, metrics, message):
    config = TrackingConfig(jsonl_path="m.jsonl")
    with Tracker(config, {}, run_dir=tmp_path) as tracker:
        tracker.log(2, {"train/loss": 0.5})
        written = (tmp_path / "m.jsonl").read_bytes()
        with pytest.raises(ValueError, match=message):
            tracker.log(step, {"rollout/reward_mean": 1.0, **metrics})
        assert (tmp_path / "m.jsonl").read_bytes() == written
        assert capsys.readouterr().out == "step 2  train/loss 0.5\n"
        tracker.log(3, {"train/loss": 0.25})  # a refused call does not advance the step
    assert [row["step"] for row in read_metrics_jsonl(tmp_path / "m.jsonl")] == [2, 3]


def test_non_zero_rank_writes_and_prints_nothing_but_refuses_the_same_calls(tmp_path, capsys):
    config = TrackingConfig(wandb_mode="offline", jsonl_path="m.jsonl")
    tracker = Tracker(config, RUN_CONFIG, enabled=False, total_steps=3, run_dir=tmp_path / "run")
    tracker.log(1, {"train/loss": torch.tensor(0.5), "perf/step_seconds": 1.0})
    tracker.console("only rank 0 prints")
    with pytest.raises(ValueError, match="metric 'loss' must be a name"):
        tracker.log(2, {"loss": 1.0})
    with pytest.raises(ValueError, match="got 1 after 1"):
        tracker.log(1, {"train/loss": 1.0})
    tracker.finish()
    assert tracker.wandb_dir is None
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_jsonl_appends_after_cutting_off_a_line_left_unfinished_by_a_crash(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "time": 1.0, "train/loss": 0.5}\n{"step": 2, "ti')
    with Tracker(TrackingConfig(jsonl_path="m.jsonl"), {}, run_dir=tmp_path) as tracker:
        tracker.log(2, {"train/loss": 0.25})
    message = f"{path}: removed an unfinished last line (15 bytes) left by a crash"
    assert capsys.readouterr().out.splitlines() == [message, "step 2  train/loss 0.25"]
    rows = read_metrics_jsonl(path)
    assert rows[0] == {"step": 1, "time": 1.0, "train/loss": 0.5}
    assert len(rows) == 2 and rows[1]["step"] == 2 and rows[1]["train/loss"] == 0.25


def test_a_run_left_by_an_exception_is_marked_failed(tmp_path):
    config = TrackingConfig(wandb_mode="offline")  # no run_name: the run is named after its directory
    with (pytest.raises(RuntimeError, match="step failed"),
          Tracker(config, {"a": 1}, run_dir=tmp_path / "run-7") as tracker):
        tracker.log(1, {"train/loss": 0.5})
        raise RuntimeError("step failed")
    run = read_wandb_run(tmp_path)
    assert (run.name, run.exit_code) == ("run-7", 1) and [row["train/loss"] for row in run.history] == [0.5]


def test_online_mode_without_a_login_says_to_use_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in {"HOME": tmp_path, "NETRC": tmp_path / "netrc", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                        "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5",
                        "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(RuntimeError, match="set tracking.wandb_mode=offline") as error:
        Tracker(TrackingConfig(wandb_mode="online", jsonl_path="m.jsonl"), {}, run_dir=tmp_path / "run")
    assert "No API key configured" in str(error.value)
    assert not (tmp_path / "run" / "m.jsonl").exists()


def test_terminal_gets_a_progress_bar_with_key_metrics_and_console_lines(tmp_path, monkeypatch):
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("COLUMNS", "160")
    with Tracker(TrackingConfig(), {}, total_steps=4, run_dir=tmp_path) as tracker:
        tracker.log(3, {"train/loss": 0.5, "rollout/reward_mean": 0.25, "train/grad_norm": 7.0})
        tracker.console("a message")
        tracker.log(4, {"train/loss": 0.125})
    terminal.flush()
    os.set_blocking(leader, False)
    chunks = []  # a pty hands out its output in pieces (a loaded machine's live display refreshes more often)
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    raw = b"".join(chunks).decode()
    terminal.close()
    os.close(leader)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "\x1b[" in raw  # rendered for a terminal, not plain lines
    assert re.search(r"step 3/4 .*━.* rollout/reward_mean 0\.25  train/loss 0\.5\r", screen)
    assert "a message\r\n" in screen and "grad_norm" not in screen
    assert re.search(r"step 4/4 .* train/loss 0\.125\r\n$", screen)


def test_finish_survives_wandb_core_stopped_by_the_same_signal(tmp_path):
    """On a Slurm requeue every process of the job gets SIGTERM, wandb-core too: closing the run must not
    turn the trainer's clean exit into a ConnectionResetError; the JSONL is still closed complete."""
    script = f"""
import os, signal, time
from pathlib import Path
from megatron_rl.config.sections import TrackingConfig
from megatron_rl.tracking import Tracker

def wandb_core_pids():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{{pid}}/stat").read_text()
            cmdline = Path(f"/proc/{{pid}}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"wandb-core" in cmdline:
            yield int(pid)

config = TrackingConfig(wandb_mode="offline", run_name="r", jsonl_path="metrics.jsonl")
tracker = Tracker(config, {{}}, run_dir=Path({str(tmp_path)!r}))
tracker.log(1, {{"train/loss": 0.5}})
pids = list(wandb_core_pids())
assert pids, "no wandb-core child found"
for pid in pids:
    os.kill(pid, signal.SIGTERM)
    while Path(f"/proc/{{pid}}").exists() and "Z" not in Path(f"/proc/{{pid}}/stat").read_text().split(")")[1][:3]:
        time.sleep(0.05)
tracker.log(2, {{"train/loss": 0.25}})
tracker.finish()
print("finished")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[:4000]
    assert "finished" in done.stdout and "wandb-core has stopped" in done.stdout + done.stderr
    assert [row["train/loss"] for row in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [0.5, 0.25]

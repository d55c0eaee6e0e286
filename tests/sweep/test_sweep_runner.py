"""megatron_rl/sweep/runner.py with a fake run function (the torchrun launch is tested in tests/e2e/).

The fake writes metrics rows the way the trainer's tracker does and returns an exit code; a config without
model.hf_path (the schema's defaults) validates without a checkpoint.
"""

import json
import socket
from pathlib import Path

import pytest
import yaml

from megatron_rl.config import load_config
from megatron_rl.sweep import SweepError, SweepSpec, parse_grid_option, read_summary, run_sweep
from megatron_rl.sweep.launch import with_free_engine_ports
from megatron_rl.sweep.run_dir import RunDir
from megatron_rl.sweep.runner import PORT_ATTEMPTS

STEPS = 20


class FakeRuns:
    """A run function: logs STEPS rows (reward of step k: seed / 10 + k / 100) unless told otherwise."""

    def __init__(self, exit_codes: dict[str, int] | None = None, rows: dict[str, int] | None = None,
                 interrupt: str | None = None, ports_taken: dict[str, int] | None = None):
        self.exit_codes, self.rows, self.interrupt = exit_codes or {}, rows or {}, interrupt
        self.ports_taken = dict(ports_taken or {})  # name -> how many starts fail on a taken engine port
        self.calls: list[str] = []

    def __call__(self, run_dir: RunDir, world_size: int, on_step) -> int:
        name = run_dir.path.name
        self.calls.append(name)
        if self.ports_taken.get(name, 0) > 0:
            self.ports_taken[name] -= 1
            run_dir.log_path.write_text("EngineStartError: rollout.engines[0]: something already listens on "
                                        "127.0.0.1:40000 (a server left from another run?)\n")
            return 1
        assert world_size == 1 and run_dir.config_path.exists()
        seed = load_config(run_dir.config_path).data.seed
        with run_dir.log_path.open("a") as log:
            log.write("".join(f"log line {i} of {name}\n" for i in range(30)))
        with run_dir.metrics_path.open("a") as metrics:
            for step in range(1, self.rows.get(name, STEPS) + 1):
                metrics.write(json.dumps({"step": step, "time": 0.0, "rollout/reward_mean": seed / 10 + step / 100})
                              + "\n")
                on_step(step)
        if name == self.interrupt:
            raise KeyboardInterrupt
        return self.exit_codes.get(name, 0)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_steps": STEPS}, "tracking": {"wandb_mode": "disabled"}}))
    return path


def spec(config: Path, out: Path, grid=("algorithm.loss=kpo,vespo",), seeds=2, overrides=()) -> SweepSpec:
    return SweepSpec(config, tuple(parse_grid_option(g) for g in grid), seeds, out, tuple(overrides), "the command")


KPO0, VESPO0, KPO1, VESPO1 = ("algorithm.loss=kpo__seed=0", "algorithm.loss=vespo__seed=0",
                              "algorithm.loss=kpo__seed=1", "algorithm.loss=vespo__seed=1")


def test_every_run_gets_its_config_and_the_summary_its_rewards(config, tmp_path, capsys):
    out, runs = tmp_path / "sweep", FakeRuns()
    assert run_sweep(spec(config, out), runs, rich_bar=False) == 0
    assert runs.calls == [KPO0, VESPO0, KPO1, VESPO1]
    resolved = load_config(out / VESPO1 / "config.yaml")
    assert (resolved.algorithm.loss, resolved.data.seed, resolved.tracking.dir, resolved.tracking.run_name) == (
        "vespo", 1, str(out.resolve()), VESPO1)
    assert resolved.checkpoint.dir == str(out.resolve() / VESPO1 / "checkpoints")
    assert (resolved.tracking.jsonl_path, resolved.checkpoint.resume) == ("metrics.jsonl", False)
    summary = read_summary(out)
    assert summary["grid"] == {"algorithm.loss": ["kpo", "vespo"]} and summary["seeds"] == [0, 1]
    assert summary["command"] == "the command"
    run = summary["runs"][3]
    assert (run["name"], run["grid_point"], run["seed"], run["status"], run["exit_code"], run["steps"]) == (
        VESPO1, {"algorithm.loss": "vespo"}, 1, "finished", 0, STEPS)
    assert run["reward_final"] == pytest.approx(0.1 + 0.20, abs=1e-12)
    assert run["reward_last_10pct"] == pytest.approx(0.1 + (0.19 + 0.20) / 2, abs=1e-12)  # ceil(10 % of 20) = 2
    assert run["wall_seconds"] >= 0 and run["dir"] == str(out.resolve() / VESPO1)
    output = capsys.readouterr().out
    assert f"sweep: run 4/4 {VESPO1}: step {STEPS}/{STEPS}, eta 0s" in output
    assert "sweep: 4 of 4 runs finished (0 finished before); 0 failed" in output


def test_finished_runs_are_skipped_and_unfinished_ones_cleared_and_rerun(config, tmp_path, capsys):
    out = tmp_path / "sweep"
    run_sweep(spec(config, out), FakeRuns(), rich_bar=False)
    (out / KPO1 / "finished.json").unlink()  # as if killed after its last row, before the marker
    (out / KPO1 / "stale.txt").write_text("half-written")
    kept = (out / KPO0 / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = FakeRuns()
    assert run_sweep(spec(config, out), again, rich_bar=False) == 0
    assert again.calls == [KPO1]
    assert not (out / KPO1 / "stale.txt").exists()
    assert len((out / KPO1 / "metrics.jsonl").read_text().splitlines()) == STEPS  # not appended to the old rows
    assert (out / KPO0 / "metrics.jsonl").read_text() == kept
    output = capsys.readouterr().out
    assert f"run 1/4 {KPO0}: finished before, skipped" in output
    assert "4 of 4 runs finished (3 finished before)" in output
    assert [run["reused"] for run in read_summary(out)["runs"]] == [True, True, False, True]


def test_a_failed_run_is_reported_and_the_sweep_goes_on(config, tmp_path, capsys):
    out = tmp_path / "sweep"
    runs = FakeRuns(exit_codes={VESPO0: 3}, rows={KPO1: STEPS - 1})
    assert run_sweep(spec(config, out), runs, rich_bar=False) == 1
    assert runs.calls == [KPO0, VESPO0, KPO1, VESPO1]
    output = capsys.readouterr().out
    assert f"run 2/4 {VESPO0} FAILED: exit code 3; the end of {out.resolve() / VESPO0 / 'run.log'}:\n" in output
    assert f"log line 29 of {VESPO0}" in output and f"log line 9 of {VESPO0}\n" not in output  # the last 20 lines
    assert f"run 3/4 {KPO1} FAILED: exit code 0 but" in output and f"has {STEPS - 1} rows, not data.train_steps" \
        in output
    assert f"2 of 4 runs finished (0 finished before); 2 failed: {VESPO0}, {KPO1}" in output
    runs_by_name = {run["name"]: run for run in read_summary(out)["runs"]}
    assert (runs_by_name[VESPO0]["status"], runs_by_name[VESPO0]["exit_code"]) == ("failed", 3)
    assert runs_by_name[KPO1]["status"] == "failed" and runs_by_name[KPO1]["steps"] == STEPS - 1
    assert not (out / VESPO0 / "finished.json").exists() and (out / VESPO1 / "finished.json").exists()
    rerun = FakeRuns()
    assert run_sweep(spec(config, out), rerun, rich_bar=False) == 0
    assert rerun.calls == [VESPO0, KPO1]


def test_an_interrupted_sweep_leaves_the_run_pending_and_the_summary_written(config, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(config, out), FakeRuns(interrupt=VESPO0), rich_bar=False)
    assert [run["status"] for run in read_summary(out)["runs"]] == ["finished", "pending", "pending", "pending"]
    assert not (out / VESPO0 / "finished.json").exists()


def test_bad_grid_values_and_override_keys_fail_before_anything_runs(config, tmp_path):
    out, runs = tmp_path / "sweep", FakeRuns()
    with pytest.raises(SweepError) as error:
        run_sweep(spec(config, out, grid=("algorithm.loss=kpo,nope", "optimizer.lr=1e-3,-1"),
                       overrides=("data.trian_steps=2",)), runs)
    loss_error = ("algorithm.loss: expected 'ppo', 'dapo', 'gspo', 'gspo_token', 'gmpo', 'cispo', 'sapo', 'kpo', "
                  "'vespo' or 'trm', got 'nope'")
    key_error = "data.trian_steps: unknown key; did you mean 'train_steps'?"
    assert error.value.problems == [  # each grid point's errors once, not once per seed
        f"grid point algorithm.loss=kpo optimizer.lr=1e-3: {key_error}",
        f"grid point algorithm.loss=kpo optimizer.lr=-1: {key_error}",
        "grid point algorithm.loss=kpo optimizer.lr=-1: optimizer.lr: expected > 0.0, got -1",
        f"grid point algorithm.loss=nope optimizer.lr=1e-3: {key_error}",
        f"grid point algorithm.loss=nope optimizer.lr=1e-3: {loss_error}",
        f"grid point algorithm.loss=nope optimizer.lr=-1: {key_error}",
        "grid point algorithm.loss=nope optimizer.lr=-1: optimizer.lr: expected > 0.0, got -1",
        f"grid point algorithm.loss=nope optimizer.lr=-1: {loss_error}",
    ]
    assert runs.calls == [] and not out.exists()


def test_keys_the_sweep_sets_are_refused(config, tmp_path):
    plan = spec(config, tmp_path / "sweep", grid=("tracking.run_name=a,b",), overrides=("data.seed=3", "tracking=x"))
    with pytest.raises(SweepError) as error:
        run_sweep(plan, FakeRuns())
    assert error.value.problems == ["override data.seed: set by the sweep for every run (use --seeds)",
                                    "override tracking: set by the sweep for every run",
                                    "--grid tracking.run_name: set by the sweep for every run"]


def test_a_finished_run_with_other_settings_is_not_taken_as_this_sweeps(config, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(spec(config, out, seeds=1), FakeRuns(), rich_bar=False)
    with pytest.raises(SweepError) as error:
        run_sweep(spec(config, out, seeds=1, overrides=("optimizer.lr=0.5",)), FakeRuns())
    assert error.value.problems == [
        f"{out.resolve() / name}: finished with other settings than this sweep gives it (config, overrides or defaults "
        f"changed); remove that directory to run it again, or choose another --out" for name in (KPO0, VESPO0)]


def test_a_key_added_to_the_code_since_a_run_counts_as_its_default_and_a_changed_default_as_the_runs_value(
        config, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(spec(config, out, seeds=1), FakeRuns(), rich_bar=False)
    launched = out / KPO0 / "config.yaml"
    raw = yaml.safe_load(launched.read_text())
    del raw["rollout"]["weight_sync"]["transport"]  # as written before the key existed
    launched.write_text(yaml.safe_dump(raw))
    again = FakeRuns()
    run_sweep(spec(config, out, seeds=1), again, rich_bar=False)
    assert again.calls == []  # the missing key is read as its default: the same settings
    raw["rollout"]["weight_sync"]["bucket_mb"] = 64.0  # as if the default had been 64 when the run was made
    launched.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match=f"{KPO0}: finished with other settings"):
        run_sweep(spec(config, out, seeds=1), FakeRuns())


def test_a_run_whose_engine_port_was_taken_starts_again_on_other_ports_a_bounded_number_of_times(config, tmp_path):
    runs = FakeRuns(ports_taken={KPO0: PORT_ATTEMPTS - 1, VESPO0: PORT_ATTEMPTS}, exit_codes={KPO1: 1})
    assert run_sweep(spec(config, tmp_path / "sweep"), runs, rich_bar=False) == 1
    assert runs.calls == [KPO0] * PORT_ATTEMPTS + [VESPO0] * PORT_ATTEMPTS + [KPO1, VESPO1]  # KPO1: other failure
    status = {run["name"]: run["status"] for run in read_summary(tmp_path / "sweep")["runs"]}
    assert status == {KPO0: "finished", VESPO0: "failed", KPO1: "failed", VESPO1: "finished"}


def test_launched_engines_get_free_ports(config):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        engines = f"rollout.engines=[{{port: {port}}}, {{port: {port + 1}}}, {{port: {port + 2}, launch: false}}]"
        moved = with_free_engine_ports(load_config(config, [engines])).rollout.engines
        assert moved[0].port != port and moved[1].port not in (port, moved[0].port)
        assert moved[2].port == port + 2  # attached to, not launched: kept
        for engine in moved[:2]:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", engine.port))

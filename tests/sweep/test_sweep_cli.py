"""`megatron-rl sweep` and `megatron-rl report` argument handling, as real subprocesses (no run is started)."""

import subprocess
import sys

import yaml


def megatron_rl(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_bad_grid_values_exit_2_naming_the_grid_point_and_nothing_is_created(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"tracking": {"wandb_mode": "disabled"}}))
    result = megatron_rl("sweep", "c.yaml", "--grid", "algorithm.loss=kpo,nope", "--out", "out", "data.train_steps=0",
                         cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "megatron-rl sweep: nothing was run:",
        "grid point algorithm.loss=kpo: data.train_steps: expected > 0, got 0",
        "grid point algorithm.loss=nope: algorithm.loss: expected 'ppo', 'dapo', 'gspo', 'gspo_token', 'gmpo', "
        "'cispo', 'sapo', 'kpo', 'vespo' or 'trm', got 'nope'",
        "grid point algorithm.loss=nope: data.train_steps: expected > 0, got 0",
    ]
    assert not (tmp_path / "out").exists()


def test_a_malformed_grid_option_and_an_unknown_option_are_usage_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("{}\n")
    result = megatron_rl("sweep", "c.yaml", "--grid", "algorithm.loss", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "--grid 'algorithm.loss': expected KEY=V1,V2,... with a dotted config key"
    result = megatron_rl("sweep", "c.yaml", "--out", "out", "--seeds", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--seeds: expected an integer >= 1, got '0'" in result.stderr
    result = megatron_rl("validate", "c.yaml", "--bogus", "data.seed=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "megatron-rl: error: unrecognized arguments: --bogus data.seed=1"


def test_overrides_may_follow_the_options(tmp_path):
    (tmp_path / "c.yaml").write_text("{}\n")
    result = megatron_rl("plan", "c.yaml", "--gpus-per-node", "4", "parallel.world_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == megatron_rl("plan", "c.yaml", "parallel.world_size=2", "--gpus-per-node", "4",
                                        cwd=tmp_path).stdout


def test_report_of_a_directory_without_a_sweep_exits_2(tmp_path):
    result = megatron_rl("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"megatron-rl report: {tmp_path / 'sweep.json'}: no sweep summary (is {tmp_path} the "
                             "--out directory of a sweep?)\n")

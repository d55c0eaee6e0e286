"""`megatron-rl validate`, run as a real subprocess."""

import subprocess
import sys
from pathlib import Path

from megatron_rl.config import dump_config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"


def megatron_rl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_validate_prints_the_resolved_config():
    result = megatron_rl("validate", str(EXAMPLE), "parallel.tp=2", "algorithm.kpo.q=1e-4")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == dump_config(load_config(EXAMPLE, ["parallel.tp=2", "algorithm.kpo.q=1e-4"]))
    assert "  tp: 2\n" in result.stdout and "    q: 0.0001\n" in result.stdout


def test_validate_prints_every_error_and_exits_2():
    result = megatron_rl("validate", str(EXAMPLE), "parallel.tp=3", "algorithm.kpo.qq=1",
                         "algorithm.kpo.q=-1", "rollout.sampling.top_p=two")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "algorithm.kpo.qq: unknown key; did you mean 'q'?",
        "parallel.world_size: must be a multiple of tp * pp * cp = 3, got 2",
        "rollout.sampling.top_p: expected a valid number, got 'two'",
        "algorithm.kpo.q: must be > 0, got -1.0",
    ]


def test_missing_file_is_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = megatron_rl("validate", str(missing))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{missing}: cannot read the file: No such file or directory\n"


def test_yaml_syntax_error_is_one_line_and_exits_2(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("parallel:\n  tp: 2\n  pp: [1, 2\n")
    result = megatron_rl("validate", str(broken))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"{broken}: invalid YAML: expected ',' or ']', but got '<stream end>' "
                             "at line 4, column 1\n")


def test_no_subcommand_is_a_usage_error():
    result = megatron_rl()
    assert result.returncode == 2
    last_line = result.stderr.splitlines()[-1]
    assert last_line == "megatron-rl: error: the following arguments are required: COMMAND"

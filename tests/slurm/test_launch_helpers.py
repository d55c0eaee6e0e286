"""The launch scripts' pieces that need no cluster: engine placement, config values, refusals, the metrics cut.

Runs everywhere (no `slurm` marker): the helpers of launch/ and launch/slurm/ are loaded from their files,
rl.sbatch and submit.sh refuse before they reach Slurm, and the trainer's resume cut is checked with the
real Tracker appending to the file it cut.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.config import TrackingConfig, load_config
from megatron_rl.tracking import Tracker, read_metrics_jsonl

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
NO_MODEL = "model.hf_path=null"  # the quickstart's model is written by `megatron-rl toy-task`; not needed here
RECIPE = ROOT / "configs" / "recipes" / "vespo_qwen3_30b_a3b_base.yaml"  # engines on rollout-0 and rollout-1


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rollout_engines = load_script(ROOT / "launch" / "slurm" / "rollout_engines.py")
config_value = load_script(ROOT / "launch" / "config_value.py")


def test_each_host_of_the_config_is_one_rollout_node():
    cfg = load_config(RECIPE)
    assert rollout_engines.engine_hosts(cfg) == ["rollout-0", "rollout-1"]
    placed = rollout_engines.placed_engines(cfg, ["gpu07", "gpu11"])
    assert [(e.host, e.port, e.tp, e.kind, e.launch) for e in placed] == (
        [("gpu07", 30000 + i, 2, "sglang", False) for i in range(4)]
        + [("gpu11", 30000 + i, 2, "sglang", False) for i in range(4)])


def test_the_quickstart_engine_moves_to_the_rollout_node_and_the_learner_accepts_the_override():
    cfg = load_config(QUICKSTART, [NO_MODEL])
    override = rollout_engines.learner_override(rollout_engines.placed_engines(cfg, ["node3"]))
    engines = load_config(QUICKSTART, [NO_MODEL, override]).rollout.engines
    expected = cfg.rollout.engines[0].model_copy(update={"host": "node3", "launch": False})
    assert engines == [expected] and cfg.rollout.engines[0].launch  # the config itself launches locally


def test_a_node_count_other_than_the_hosts_is_refused():
    with pytest.raises(ValueError, match=r"1 rollout node\(s\) \(gpu07\) but rollout.engines names 2 host\(s\) "
                                         r"\(rollout-0 rollout-1\)"):
        rollout_engines.placed_engines(load_config(RECIPE), ["gpu07"])


def test_config_values(capsys):
    assert config_value.config_value("parallel.world_size", str(QUICKSTART), [NO_MODEL]) == 2
    assert config_value.config_value("tracking.run_name", str(QUICKSTART), [NO_MODEL, "tracking.run_name=null"]) is None
    assert config_value.main(["rollout.token_env", str(QUICKSTART), NO_MODEL]) == 0
    assert capsys.readouterr().out == "MEGATRON_RL_SERVE_TOKEN\n"
    assert config_value.main(["parallel.world_size.x", str(QUICKSTART), NO_MODEL]) == 2
    assert "the config has no key 'parallel.world_size.x'" in capsys.readouterr().err
    assert config_value.main(["parallel.world_size", str(QUICKSTART), NO_MODEL, "parallel.world_size=0"]) == 2
    assert "parallel.world_size" in capsys.readouterr().err


def test_rl_sbatch_refuses_a_job_that_is_not_heterogeneous(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    result = subprocess.run(["bash", ROOT / "launch" / "slurm" / "rl.sbatch", QUICKSTART], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "submit it as a heterogeneous job of two components" in result.stderr


def test_submit_refuses_learner_nodes_that_do_not_make_the_world_size(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "LEARNER_NODES": "3", "SLURM_CONF": str(tmp_path / "none")}
    result = subprocess.run([ROOT / "launch" / "slurm" / "submit.sh", QUICKSTART, NO_MODEL], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "LEARNER_NODES=3 x 0 tasks per node is not parallel.world_size = 2" in result.stderr


def test_resume_cuts_the_metrics_after_the_checkpoint_step_and_the_tracker_appends_after_the_cut(tmp_path):
    from megatron_rl.trainer import _drop_metrics_after

    config = TrackingConfig(jsonl_path="metrics.jsonl")
    with Tracker(config, {}, run_dir=tmp_path) as killed:  # the run that logged steps 1..5, then was killed
        for step in range(1, 6):
            killed.log(step, {"train/loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    messages = []
    with Tracker(config, {}, run_dir=tmp_path) as resumed:  # resumes from the checkpoint of step 3
        _drop_metrics_after(path, 3, messages.append)
        assert path.read_bytes() == b"".join(lines[:3])
        resumed.log(4, {"train/loss": 40.0})
    assert [(row["step"], row["train/loss"]) for row in read_metrics_jsonl(path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert messages == [f"{path}: dropped 2 row(s) of steps after 3, which the resume trains again"]
    _drop_metrics_after(path, 4, messages.append)  # nothing after step 4: untouched, nothing said
    assert len(messages) == 1 and json.loads(path.read_text().splitlines()[-1])["step"] == 4

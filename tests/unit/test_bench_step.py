"""Smoke test of tools/bench_step.py: the --quick run (with --profile) completes and prints the ratio line.

The ratios of a --quick run are not meaningful (tiny model, a shared machine); only the output is checked.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_rl import platform

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NUMBER = r"\d+\.\d+"


def test_bench_step_quick_prints_the_ratio_line():
    env = {k: v for k, v in os.environ.items()  # a plain single process, every CPU patch on
           if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_") and k != platform.DISABLE_PATCHES_ENV}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), "--quick", "--profile", "kpo"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio RL / CE" in out.stdout, out.stdout
    ratio = rf"{NUMBER} \(paired {NUMBER}, min {NUMBER}\)"
    assert re.search(rf"^  rl/kpo\s+/ ce/logprob\s+{ratio}\s+/ ce/mcore\s+{ratio}\s+(ok|ABOVE GOAL)$",
                     out.stdout, re.MULTILINE), out.stdout
    for variant in ("rl/kpo", "ce/logprob", "ce/mcore"):
        assert re.search(rf"^{variant}\s+\d+\s+{NUMBER}", out.stdout, re.MULTILINE), out.stdout
    assert "breakdown, ms per step" in out.stdout, out.stdout
    assert re.search(rf"^\s+compute_policy_loss\s+{NUMBER}\s+{NUMBER}", out.stdout, re.MULTILINE), out.stdout
    assert "skipped" not in out.stdout, out.stdout

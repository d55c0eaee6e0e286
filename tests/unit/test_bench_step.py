"""Smoke test of tools/bench_step.py: the --quick run (with --profile) completes and prints the ratio line.

The ratios of a --quick run are not meaningful (tiny model, a shared machine); only the output is checked.
"""

import re
import subprocess
import sys
from pathlib import Path

from single_process import plain_process_env

from megatron_rl import platform

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+"


def test_bench_step_quick_prints_the_ratio_line():
    env = plain_process_env()  # a plain single process, every CPU patch on
    env.pop(platform.DISABLE_PATCHES_ENV, None)
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

"""Smoke test of tools/bench_packing.py: the --quick run completes, both layouts train the same (step losses
within fp32 rounding) and the packed one computes no padding beyond the row ends. Its timings are not checked."""

import re
import subprocess
import sys
from pathlib import Path

from single_process import plain_process_env

from megatron_rl import platform

ROOT = Path(__file__).resolve().parents[2]


def test_bench_packing_quick():
    env = plain_process_env()  # a plain single process, every CPU patch on
    env.pop(platform.DISABLE_PATCHES_ENV, None)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_packing.py"), "--quick"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = re.search(r"t = 256 in \d+ segments .*per segment [\d.]+ ms, block-diagonal mask [\d.]+ ms; "
                     r"max \|diff\| ([\d.e+-]+)", out.stdout)
    assert diff and float(diff.group(1)) < 1e-5, out.stdout
    rows = {m.group(1): (int(m.group(2)), float(m.group(3).rstrip("%")))
            for m in re.finditer(r"^(padded|packed)\s+\d+\s+(\d+)\s+([\d.]+%)", out.stdout, re.MULTILINE)}
    tokens = int(re.search(r"(\d+) tokens \(lengths", out.stdout).group(1))
    assert rows["packed"] == (tokens, 0.0) and rows["padded"][0] > tokens, out.stdout
    loss_diff = re.search(r"packed / padded throughput: [\d.]+x .*step-loss difference between the layouts: "
                          r"([\d.e+-]+)", out.stdout)
    assert loss_diff and float(loss_diff.group(1)) <= 5e-5, out.stdout

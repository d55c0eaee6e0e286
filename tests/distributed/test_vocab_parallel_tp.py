"""Vocab-parallel log-probs / entropy / KL over 2 gloo ranks (torchrun) equal the unsharded values,
and each rank's gradient equals its vocabulary slice of the unsharded gradient.

Tolerance: 1e-10 in float64, 1e-5 in float32. Cases cover temperature != 1, a chunk size that
divides neither T nor B * T, and labels all owned by the last rank. As a negative control, the
same shard without the TP group (a per-rank softmax) must differ.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vocab_parallel_worker import CASES, TOLERANCE  # noqa: E402

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
WORLD = 2

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp2")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         str(WORKER), str(out_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_unsharded(results, case):
    tolerance = TOLERANCE[case.split("/")[0]]
    for rank, rank_results in enumerate(results):
        r = rank_results["cases"][case]
        assert r["value_diff"] <= tolerance, (rank, r)
        assert r["grad_diff"] <= tolerance, (rank, r)
        assert r["grad_norm"] > 1e-3, (rank, r)  # a zero gradient would make the comparison vacuous
        assert r["naive_diff"] > 1e-2, (rank, r)  # without the TP group the shard alone is wrong


def test_label_range_is_the_global_vocabulary(results):
    for rank_results in results:
        assert "[0, 74)" in rank_results["label_error"], rank_results["label_error"]

"""Every policy loss under context parallelism (gloo, 2 and 4 ranks via torchrun) equals the
same loss on whole sequences on one rank: value, gradient w.r.t. the local log-probs, metrics.

float64 throughout; tolerance 1e-6 as the issue asks (observed: <= 1e-15). As a negative
control, the same shard computed without the CP group (a naive per-rank loss) must differ.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cp_loss_worker import CASES, PROMPT_CASES  # noqa: E402

WORKER = Path(__file__).with_name("cp_loss_worker.py")
TOL = 1e-6
WORLD_SIZES = (2, 4)
MASKED_CASES = {"trm": "trm/accept_rate", "trm/combined": "trm/accept_rate",
                "ppo/all-corrections": "trm_mask/accept_rate", "gmpo/geo-mask": "mismatch/geo_mask_keep_frac"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world in WORLD_SIZES:
        out_dir = tmp_path_factory.mktemp(f"cp{world}")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
             str(WORKER), str(out_dir)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[world] = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return out


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(CASES) + [f"{name}/{layout}" for name in PROMPT_CASES
                                                  for layout in ("with-prompt", "ragged-prompt")])
def test_loss_grad_and_metrics_match_single_rank(results, world, case):
    for rank, rank_results in enumerate(results[world]):
        r = rank_results["cases"][case]
        assert r["metric_keys_match"], (rank, case)
        assert r["loss_diff"] <= TOL, (rank, r)
        assert r["grad_diff"] <= TOL, (rank, r)
        assert r["metric_diff"] <= TOL, (rank, r)
        assert r["grad_norm"] > 1e-3, f"{case}: a zero gradient would make this comparison vacuous"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(MASKED_CASES))
def test_masking_cases_are_not_degenerate(results, world, case):
    kept = results[world][0]["cases"][case]["metrics"][MASKED_CASES[case]]
    assert 0.0 < kept < 1.0, (case, kept)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sequence_level_losses_need_the_cp_group(results, world):
    """Computed on a shard without the CP group, sequence-level losses come out wrong."""
    cases = results[world][0]["cases"]
    for case in ("kpo/q=1e-2", "gspo/eps=0.05", "gmpo", "vespo", "trm", "ppo/seq-mean-token-mean"):
        assert cases[case]["naive_diff"] > 1e-4, case


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_primitives(results, world):
    for rank_results in results[world]:
        for name, diff in rank_results["primitives"].items():
            assert diff <= 1e-12, (name, diff)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sign_switch_pairs_across_chunk_boundaries_are_counted_once(results, world):
    """Lengths 48, 37, 11, 1, 0, 29 hold 121 adjacent pairs; the series flips sign every 6 tokens
    (18 flips), at chunk boundaries for cp = 4 and at every other one for cp = 2. Without the CP
    group the boundary pairs are lost and the two chunks of a rank are wrongly joined."""
    for rank_results in results[world]:
        counts = rank_results["boundary_switches"]
        assert counts["loop"] == [18, 121]
        assert counts["cp"] == counts["loop"]
        assert counts["naive"] != counts["loop"]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_diagnostics_are_present_and_not_degenerate(results, world):
    cases = results[world][0]["cases"]
    for case in ("kpo/q=1e-2", "kpo/q=1e-2/ragged-prompt"):
        metrics = cases[case]["metrics"]
        assert 0 < metrics["kpo/x_hat_switch_freq"] < metrics["kpo/z_switch_freq"] < 1, metrics
        assert 0 < metrics["kpo/x_hat_var"] < metrics["kpo/z_var"], metrics
    vespo = cases["vespo"]["metrics"]
    assert vespo["vespo/phi_min"] < vespo["vespo/phi_p10"] < vespo["vespo/phi_p50"] < vespo["vespo/phi_p90"]
    rates = {key.removeprefix("trm/reject_rate_len_"): value for key, value in cases["trm"]["metrics"].items()
             if "reject_rate_len_" in key}
    assert set(rates) == {"1-1", "8-15", "16-31", "32-63"}  # lengths 1, 11, 29 and 37, 48
    assert min(rates.values()) == 0 and max(rates.values()) == 1, rates
    assert all(0.5 < case["metrics"]["policy/entropy"] < 1.5 for case in cases.values())

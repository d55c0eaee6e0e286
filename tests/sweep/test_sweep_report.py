"""megatron_rl/studies/: statistics over seeds per grid point, the two PNGs and the markdown report."""

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from megatron_rl.studies.aggregate import Spread, aggregate
from megatron_rl.studies.report import write_report
from megatron_rl.sweep.summary import write_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = {("kpo", 0): [0.1, 0.2, 0.3], ("kpo", 1): [0.3, 0.2, 0.5, 0.9], ("vespo", 0): [0.0, 0.5]}


def run_record(out: Path, loss: str, seed: int, status: str) -> dict:
    name = f"algorithm.loss={loss}__seed={seed}"
    run_dir = out / name
    run_dir.mkdir(parents=True)
    rewards = CURVES.get((loss, seed), [0.7])
    rows = [{"step": step, "time": 0.0, "rollout/reward_mean": reward} for step, reward in enumerate(rewards, 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "config.yaml").write_text(f"algorithm:\n  loss: {loss}\n")
    return {"name": name, "dir": str(run_dir), "grid_point": {"algorithm.loss": loss}, "seed": seed,
            "train_steps": 3, "status": status, "reused": False, "exit_code": 0 if status == "finished" else 1,
            "wall_seconds": 10.0 + seed, "steps": len(rows), "reward_final": rewards[-1],
            "reward_last_10pct": sum(rewards) / len(rewards), "error": None if status == "finished" else "exit code 1"}


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    out = tmp_path / "sweep"
    runs = [run_record(out, "kpo", 0, "finished"), run_record(out, "vespo", 0, "finished"),
            run_record(out, "kpo", 1, "finished"), run_record(out, "vespo", 1, "failed")]
    write_summary(out, {"command": "megatron-rl sweep c.yaml --grid algorithm.loss=kpo,vespo --seeds 2 --out sweep",
                        "config": "c.yaml", "overrides": ["data.train_steps=3"],
                        "grid": {"algorithm.loss": ["kpo", "vespo"]}, "seeds": [0, 1], "runs": runs})
    return out


def test_curves_are_mean_min_max_over_seeds_on_the_steps_every_seed_logged(sweep_dir):
    kpo, vespo = aggregate(json.loads((sweep_dir / "sweep.json").read_text()))
    assert (kpo.label, kpo.seeds, kpo.steps, kpo.not_finished) == ("algorithm.loss=kpo", (0, 1), (1, 2, 3), 0)
    for got, want in zip(kpo.curve, [Spread(0.2, 0.1, 0.3), Spread(0.2, 0.2, 0.2), Spread(0.4, 0.3, 0.5)],
                         strict=True):
        assert (got.mean, got.low, got.high) == pytest.approx((want.mean, want.low, want.high), abs=1e-12)
    assert (kpo.final.mean, kpo.final.low, kpo.final.high) == pytest.approx((0.6, 0.3, 0.9), abs=1e-12)
    assert kpo.last_10pct_values == pytest.approx((0.2, 0.475), abs=1e-12)
    assert kpo.wall_seconds == pytest.approx(10.5, abs=1e-12)
    assert (vespo.seeds, vespo.steps, vespo.not_finished) == ((0,), (1, 2), 1)  # the failed seed is left out


def test_report_embeds_valid_pngs_with_the_command_seeds_and_settings(sweep_dir):
    report = write_report(sweep_dir)
    for png in ("reward_curves.png", "final_reward.png"):
        data = (sweep_dir / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        assert imread(sweep_dir / png).shape[:2] == (440, 770)  # 7 x 4 inches at 110 dpi
    text = report.read_text()
    assert "```bash\nmegatron-rl sweep c.yaml --grid algorithm.loss=kpo,vespo --seeds 2 --out sweep\n```" in text
    assert "- seeds (data.seed): 0, 1\n" in text and "- overrides for every run: `data.train_steps=3`\n" in text
    assert "- runs: 4, finished 3, failed 1, not run 0\n" in text
    assert "| algorithm.loss=kpo | 0, 1 | 0.600 [0.300, 0.900] | 0.337 [0.200, 0.475] | 10.5 s |" in text
    assert "| algorithm.loss=vespo | 0 | 0.500 [0.500, 0.500] | 0.250 [0.250, 0.250] | 10.0 s |" in text
    assert "![reward curves](reward_curves.png)" in text and "![final reward](final_reward.png)" in text
    assert "- `algorithm.loss=vespo__seed=1`: failed (exit code 1)" in text
    assert "```yaml\nalgorithm:\n  loss: kpo\n```" in text

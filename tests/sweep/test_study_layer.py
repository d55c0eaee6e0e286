"""megatron_rl/studies/study.py, study_report.py, the three study definitions, metric_curves / metric_means and
the generic figures, on hand-written sweeps (no training: tests/e2e/test_study_smoke.py runs the real smokes)."""

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from megatron_rl.config import load_config
from megatron_rl.data.toy_task import write_toy_task
from megatron_rl.studies.aggregate import Spread, metric_curves, metric_means
from megatron_rl.studies.catalog import STUDIES
from megatron_rl.studies.plots import Series, plot_curves, plot_grid
from megatron_rl.studies.study import run_study, study_run
from megatron_rl.studies.trust_region import noisy_engines
from megatron_rl.sweep import expand_grid
from megatron_rl.sweep.summary import write_summary

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task_overrides(tmp_path_factory) -> tuple[str, ...]:
    """The quickstart's model and prompts (the toy task) in a temporary directory, as overrides."""
    task = write_toy_task(tmp_path_factory.mktemp("task") / "task", num_prompts=50)
    return f"model.hf_path={task / 'model'}", f"data.train_path={task / 'train.jsonl'}"


def test_staleness_keeps_the_mini_batch_and_the_optimizer_steps_and_its_smoke_grid_has_two_points():
    study = STUDIES["staleness"]
    runs = expand_grid(list(study.grid(smoke=False)), seeds=3)
    assert len(runs) == 5 * 4 * 3
    by_name = {run.name: run.overrides() for run in runs}
    assert by_name["loss=grpo__N=16__seed=2"] == [
        "algorithm.loss=ppo", "algorithm.ppo.eps_high=0.28", "data.num_mini_batches=16", "data.rollout_batch_size=512",
        "data.train_steps=9", "data.seed=2"]
    assert by_name["loss=kpo__N=1__seed=0"][-3:] == ["data.rollout_batch_size=32", "data.train_steps=144",
                                                     "data.seed=0"]
    smoke = expand_grid(list(study.grid(smoke=True)), seeds=1)
    assert [run.overrides() for run in smoke] == [
        ["algorithm.loss=vespo", "data.num_mini_batches=1", "data.rollout_batch_size=32", "data.seed=0"],
        ["algorithm.loss=vespo", "data.num_mini_batches=4", "data.rollout_batch_size=128", "data.seed=0"]]
    assert study.run_overrides(True, QUICKSTART, ("a.b=1",)) == ("checkpoint.save_interval=0", "data.train_steps=2",
                                                                 "a.b=1")


@pytest.mark.parametrize(("name", "points"), [("smoothing", 3), ("trm", 5)])
def test_every_study_point_loads_with_the_quickstart_config(name, points, task_overrides):
    study = STUDIES[name]
    user = task_overrides
    runs = expand_grid(list(study.grid(smoke=False)), seeds=1)
    assert len(runs) == points
    configs = [load_config(QUICKSTART, [*study.run_overrides(False, QUICKSTART, user), *run.overrides()])
               for run in runs]
    assert {config.data.train_steps for config in configs} == {study.steps}
    if name == "smoothing":
        assert [c.algorithm.kpo.q for c in configs] == [1e-6, 1e-4, 1e-2]
        assert {(c.algorithm.loss, c.data.num_mini_batches, c.data.rollout_batch_size) for c in configs} == {
            ("kpo", 4, 128)}
    else:
        assert [(c.algorithm.loss, c.algorithm.trm.max_k2, c.algorithm.trm.avg_k3) for c in configs] == [
            ("trm", float("inf"), None), ("ppo", 0.05, None), ("trm", 0.05, None), ("trm", None, 0.001),
            ("trm", 0.1, 0.002)]
        assert (configs[1].algorithm.ppo.eps_low, configs[1].algorithm.ppo.eps_high) == (0.2, 0.28)
        assert configs[1].algorithm.corrections.trm.max_k2 == float("inf")
        assert all(c.algorithm.corrections.trm is None for i, c in enumerate(configs) if i != 1)
        assert {(c.rollout.engines[0].logit_noise_std, c.data.num_mini_batches) for c in configs} == {(0.1, 1)}


def test_noisy_engines_keeps_each_engine_of_the_base_config_and_adds_the_noise(task_overrides):
    override, = noisy_engines(QUICKSTART, (*task_overrides, "rollout.engines=[{port: 1}, {port: 2, dtype: bfloat16}]"))
    engines = json.loads(override.removeprefix("rollout.engines="))
    assert [(e["port"], e["dtype"], e["logit_noise_std"], e["kind"]) for e in engines] == [
        (1, "float32", 0.1, "cpu"), (2, "bfloat16", 0.1, "cpu")]


def test_a_smoke_report_goes_to_the_sweep_directory_and_a_full_one_to_docs_results():
    smoke = study_run("trm", smoke=True, seeds=None, out=None, report_dir=None, config=None, overrides=["x.y=1"])
    assert (smoke.seeds, smoke.out, smoke.report_dir) == (1, Path("runs/studies/trm-smoke"),
                                                         Path("runs/studies/trm-smoke"))
    assert smoke.command == ("megatron-rl study trm --smoke --seeds 1 --out runs/studies/trm-smoke --report-dir "
                             "runs/studies/trm-smoke --config configs/quickstart.yaml x.y=1")
    full = study_run("trm", smoke=False, seeds=None, out=None, report_dir=None, config=None, overrides=[])
    assert (full.seeds, full.out, full.report_dir) == (3, Path("runs/studies/trm"), Path("docs/results"))


def run_record(out: Path, variant: str, seed: int, rows: list[dict]) -> dict:
    run_dir = out / f"variant={variant}__seed={seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, **row}) + "\n"
                                                   for step, row in enumerate(rows, 1)))
    (run_dir / "config.yaml").write_text("algorithm:\n  loss: trm\n")
    rewards = [row["rollout/reward_mean"] for row in rows]
    return {"name": run_dir.name, "dir": str(run_dir), "grid_point": {"variant": variant}, "seed": seed,
            "train_steps": len(rows), "status": "finished", "reused": False, "exit_code": 0, "wall_seconds": 60.0,
            "steps": len(rows), "reward_final": rewards[-1], "reward_last_10pct": rewards[-1], "error": None}


@pytest.fixture
def trm_sweep(tmp_path) -> Path:
    out = tmp_path / "sweep"
    own = [{"rollout/reward_mean": 0.1, "train/trm/accept_rate": 0.5, "train/trm/bound_unified": 2.0},
           {"rollout/reward_mean": 0.3, "train/trm/accept_rate": 0.7, "train/trm/bound_unified": 4.0}]
    other = [{"rollout/reward_mean": 0.2, "train/trm/accept_rate": 0.9}, {"rollout/reward_mean": 0.4}]
    ppo = [{"rollout/reward_mean": 0.5, "train/trm_mask/accept_rate": 1.0, "train/mismatch/log_ppl_abs_diff": 0.03}]
    runs = [run_record(out, "TRM-max", 0, own), run_record(out, "TRM-max", 1, other),
            run_record(out, "PPO-clip", 0, ppo)]
    write_summary(out, {"command": "megatron-rl study trm", "config": "c.yaml", "overrides": ["data.train_steps=2"],
                        "grid": {"variant": ["TRM-max", "PPO-clip"]},
                        "variants": {"variant": {"TRM-max": ["algorithm.loss=trm"],
                                                 "PPO-clip": ["algorithm.loss=ppo"]}},
                        "seeds": [0, 1], "runs": runs})
    return out


def test_metric_curves_and_means_are_over_the_seeds_that_logged_the_metric(trm_sweep):
    summary = json.loads((trm_sweep / "sweep.json").read_text())
    trm, ppo = metric_curves(summary, "train/trm/accept_rate")
    assert (trm.label, trm.grid_point, trm.steps) == ("variant=TRM-max", {"variant": "TRM-max"}, (1,))
    assert trm.values == (Spread(0.7, 0.5, 0.9),)
    assert ppo.steps == () and ppo.values == ()
    means = metric_means(summary, "train/trm/accept_rate")
    assert means["variant=TRM-max"] == Spread(0.75, 0.6, 0.9) and means["variant=PPO-clip"] is None
    assert metric_means(summary, "train/trm/bound_unified")["variant=TRM-max"] == Spread(3.0, 3.0, 3.0)


def test_a_full_study_report_states_the_run_the_claim_and_the_measured_tables(trm_sweep, tmp_path, monkeypatch,
                                                                              task_overrides):
    monkeypatch.setattr("megatron_rl.studies.study.run_sweep", lambda spec: 0)  # the sweep ran already
    run = study_run("trm", smoke=False, seeds=2, out=str(trm_sweep), report_dir=str(tmp_path / "docs"),
                    config=str(QUICKSTART), overrides=list(task_overrides))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "trm.discussion.md").write_text("The seeds do not separate the variants.\n")
    exit_code, path = run_study(STUDIES["trm"], run)
    report = path.read_text()
    assert (exit_code, path) == (0, tmp_path / "docs" / "trm.md")
    assert report.endswith("## Discussion\n\n*Written by hand from the results above (trm.discussion.md).*\n\n"
                           "The seeds do not separate the variants.\n")
    assert f"```bash\n{run.command}\n```" in report and "Smoke run" not in report
    assert "- grid `variant`: `TRM-max`, `PPO-clip`\n  - `TRM-max`: `algorithm.loss=trm`\n" in report
    assert "in all, 60-60 s per run" in report and "## What the papers report" in report
    assert "| variant=TRM-max | 0.75 [0.6, 0.9] | - | - | 3 [3, 3] | - |" in report
    assert "| variant=PPO-clip | 1 [1, 1] | 0.03 [0.03, 0.03] |" in report
    for png in ("reward_curves.png", "final_reward.png", "acceptance.png", "log_ppl_gap.png", "bounds.png"):
        assert (tmp_path / "docs" / "trm" / png).read_bytes().startswith(PNG_SIGNATURE)
        assert f"](trm/{png})" in report


def test_generic_figures_are_pngs_of_the_expected_size(tmp_path):
    series = [Series("a", [0, 4], [Spread(0.1, 0.0, 0.2), Spread(0.3, 0.2, 0.4)]),
              Series("b", [0, 4], [Spread(0.2, 0.2, 0.2)] * 2, dashed=True)]
    plot_curves([("p1", series), ("p2", series), ("p3", [])], tmp_path / "panels.png", "t", "x", "y", columns=2)
    assert imread(tmp_path / "panels.png").shape[:2] == (748, 924)  # 2 x 2 panels of 4.2 x 3.4 in at 110 dpi
    cells = {("kpo", "1"): Spread(0.5, 0.4, 0.6), ("kpo", "4"): None}
    plot_grid(["kpo", "vespo"], ["1", "4"], cells, tmp_path / "grid.png", "t", "loss", "N")
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG_SIGNATURE)

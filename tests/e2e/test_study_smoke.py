"""End to end: `megatron-rl study NAME --smoke` for staleness, smoothing and trm (real runs: torchrun of two gloo
learner ranks and a `megatron-rl serve` engine per run, 2 steps each, 2 grid points, 1 seed).

Checks that each smoke leaves, under pytest's tmp_path only, the sweep (2 finished runs with the study's
settings in their resolved configs), valid PNG figures, and a report that names the exact command and the
settings, says it is a smoke run, and makes no claim beyond its data (no paper comparison, no verdict words).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from megatron_rl.config import load_config
from megatron_rl.data.toy_task import write_toy_task

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VERDICT_WORDS = re.compile(r"\b(better|worse|outperform\w*|confirm\w*|reproduc\w*|improv\w*|degrad\w*|collaps\w*|"
                           r"stable|unstable|significant\w*)\b", re.IGNORECASE)
STUDIES = {  # name: (figures, the two grid points' run names, a check of the first run's resolved config)
    "staleness": (("reward_curves.png", "final_reward_grid.png"),
                  ("loss=vespo__N=1__seed=0", "loss=vespo__N=4__seed=0"),
                  lambda c: (c.algorithm.loss, c.data.num_mini_batches, c.data.rollout_batch_size) == ("vespo", 1, 32)),
    "smoothing": (("switch_frequency.png", "variance.png", "reward_curves.png", "final_reward.png"),
                  ("algorithm.kpo.q=1e-6__seed=0", "algorithm.kpo.q=1e-2__seed=0"),
                  lambda c: (c.algorithm.loss, c.algorithm.kpo.q, c.data.num_mini_batches) == ("kpo", 1e-6, 4)),
    "trm": (("reward_curves.png", "final_reward.png", "acceptance.png", "log_ppl_gap.png", "bounds.png"),
            ("variant=token-IS__seed=0", "variant=TRM-max__seed=0"),
            lambda c: (c.algorithm.loss, c.algorithm.trm.max_k2, c.rollout.engines[0].logit_noise_std)
            == ("trm", float("inf"), 0.1)),
}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("study_task")
    write_toy_task(tmp / "task", num_prompts=200)
    return tmp / "task"


@pytest.mark.parametrize("name", list(STUDIES))
def test_smoke_study_writes_its_figures_and_an_honest_report(name, task, tmp_path):
    figures, runs, check_config = STUDIES[name]
    overrides = [f"model.hf_path={task / 'model'}", f"data.train_path={task / 'train.jsonl'}"]
    command = [sys.executable, "-m", "megatron_rl.cli", "study", name, "--smoke", "--out", "out",
               "--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides]
    docs_before = _files(ROOT / "docs")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [run["name"] for run in summary["runs"]] == list(runs)
    assert all(run["status"] == "finished" and run["steps"] == 2 for run in summary["runs"])
    assert check_config(load_config(tmp_path / "out" / runs[0] / "config.yaml"))

    report_path = tmp_path / "out" / f"{name}.md"
    assert result.stdout.rstrip().endswith(f"study report: {report_path.relative_to(tmp_path)}")
    for figure in figures:
        png = tmp_path / "out" / name / figure
        assert png.read_bytes().startswith(PNG_SIGNATURE)
        height, width = imread(png).shape[:2]
        assert height >= 200 and width >= 400
    report = report_path.read_text()
    assert report.startswith("# ") and "(smoke run)" in report.splitlines()[0]
    assert "**Smoke run** (2 steps per run, one seed, a reduced grid)" in report
    assert "support no conclusion" in report
    expected = (f"megatron-rl study {name} --smoke --seeds 1 --out out --report-dir out --config "
                f"{ROOT / 'configs' / 'quickstart.yaml'} {' '.join(overrides)}")
    assert f"```bash\n{expected}\n```" in report
    assert "- seeds (data.seed): 0\n" in report and "- train steps per run: 2\n" in report
    assert "- runs: 2; finished 2, failed 0, not run 0" in report
    for value in summary["grid"][next(iter(summary["grid"]))]:
        assert f"`{value}`" in report
    assert all(f"]({name}/{figure})\n" in report for figure in figures)
    assert "## What the papers report" not in report
    assert VERDICT_WORDS.findall(report) == []
    assert _files(ROOT / "docs") == docs_before  # nothing written into docs/


def _files(directory: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in directory.rglob("*")}

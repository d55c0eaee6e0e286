"""megatron_rl/sweep/progress.py: the ETA, durations, and the plain lines written when stdout is not a terminal."""

import pytest

from megatron_rl.sweep.progress import SweepProgress, eta_seconds, format_duration


def test_eta_is_the_mean_pace_so_far_times_the_steps_left():
    assert eta_seconds(elapsed=30.0, done=10, total=40) == pytest.approx(90.0, abs=1e-12)
    assert eta_seconds(elapsed=30.0, done=40, total=40) == 0.0
    assert eta_seconds(elapsed=5.0, done=0, total=40) is None


@pytest.mark.parametrize(("seconds", "text"), [(None, "?"), (0.4, "0s"), (42, "42s"), (303, "5m03s"),
                                               (7620, "2h07m")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_progress_counts_samples_so_runs_of_few_large_steps_weigh_what_they_cost(monkeypatch):
    """Two runs of the same samples: 8 steps of 32 and 2 steps of 128. Half the first run's steps is a quarter
    of the work, and one step of the second run is as much work as four of the first."""
    now = [100.0]
    monkeypatch.setattr("megatron_rl.sweep.progress.time.monotonic", lambda: now[0])
    progress = SweepProgress(total_runs=2, total_samples=512, rich_bar=False)
    progress.start_run(1, "N=1", steps=8, samples_per_step=32)
    now[0] = 130.0
    progress.step(4)
    assert progress.done == 128
    assert progress.eta() == pytest.approx(30.0 * 384 / 128, abs=1e-9)
    progress.end_run()
    progress.start_run(2, "N=4", steps=2, samples_per_step=128)
    now[0] = 190.0
    progress.step(1)
    assert progress.done == 384
    assert progress.eta() == pytest.approx(90.0 * 128 / 384, abs=1e-9)


def test_plain_lines_show_run_i_of_n_the_step_and_the_eta(capsys):
    progress = SweepProgress(total_runs=4, total_samples=20, rich_bar=False)
    progress.start_run(3, "algorithm.loss=kpo__seed=1", 10, samples_per_step=1)
    assert progress.eta() is None
    progress.step(4)
    assert progress.done == 4
    progress.end_run()
    progress.start_run(4, "algorithm.loss=vespo__seed=1", 10, samples_per_step=1)
    progress.step(2)
    assert progress.done == 12
    progress.print("a message")
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep: run 3/4 algorithm.loss=kpo__seed=1: started, eta ?"
    assert lines[1].startswith("sweep: run 3/4 algorithm.loss=kpo__seed=1: step 4/10, eta ")
    assert lines[2].startswith("sweep: run 4/4 algorithm.loss=vespo__seed=1: started, eta ")
    assert lines[3].startswith("sweep: run 4/4 algorithm.loss=vespo__seed=1: step 2/10, eta ")
    assert lines[4] == "a message"


def test_the_rich_bar_runs_through_a_sweep(capsys):
    progress = SweepProgress(total_runs=1, total_samples=16, rich_bar=True)
    progress.start_run(1, "seed=0", 2, samples_per_step=8)
    progress.step(2)
    progress.print("above the bar")
    progress.end_run()
    progress.close()
    assert progress.done == 16 and "above the bar" in capsys.readouterr().out

"""docs/metrics.md documents every metric the trainer logs, and nothing else (its tables: tests/doc_tables.py).

- Loss metrics: `compute_policy_loss` runs for every registered loss, alone and with each correction it
  accepts (TIS and MIS at both levels, IcePop, geo_mask, TRM's mask), on two random micro-batches with
  rollout log-probs and entropy; the learner's own `_step_loss_and_metrics` combines them and adds `train/`.
  Every logged name is documented, and its row's `combined` cell names exactly the reductions
  (`metrics.REDUCTIONS`) the runs gave it.
- The trainer's own metrics: the metric-name literals of trainer.py and rollout/weight_sync.py, where the
  logged dict and the sync report are built (no name there is made at run time), are documented.
- The JSONL fields `tracking` writes besides the metrics are documented, and are the doc's only names
  without a prefix.
- Nothing else: every documented name is a trainer literal, a JSONL field, or logged by a loss run.
The keys real runs write are checked by tests/e2e/test_quickstart.py.
"""

import ast
import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from doc_tables import documented_metrics, is_documented, name_pattern
from single_process import single_process_megatron

from megatron_rl.algorithms.aggregation import GlobalCounts
from megatron_rl.algorithms.hyperparams import (
    SEQUENCE_LEVEL_LOSSES,
    CorrectionsConfig,
    GeoMaskConfig,
    IcePopConfig,
    PolicyLossConfig,
    TRMConfig,
    TruncatedISConfig,
    token_level_corrections,
)
from megatron_rl.algorithms.metrics import REDUCTIONS, accumulate
from megatron_rl.algorithms.policy_loss import POLICY_LOSSES, compute_policy_loss
from megatron_rl.learner.step import _step_loss_and_metrics
from megatron_rl.tracking import METRIC_PREFIXES, _write_line

ROOT = Path(__file__).resolve().parents[2]
TRAINER_SOURCES = ("megatron_rl/trainer.py", "megatron_rl/rollout/weight_sync.py")
CORRECTIONS = {
    "none": CorrectionsConfig(),
    "tis-token": CorrectionsConfig(tis=TruncatedISConfig(level="token")),
    "tis-sequence": CorrectionsConfig(tis=TruncatedISConfig(level="sequence")),
    "mis-token": CorrectionsConfig(mis=TruncatedISConfig(level="token")),
    "mis-sequence": CorrectionsConfig(mis=TruncatedISConfig(level="sequence")),
    "icepop": CorrectionsConfig(icepop=IcePopConfig()),
    "geo_mask": CorrectionsConfig(geo_mask=GeoMaskConfig()),
    "trm": CorrectionsConfig(trm=TRMConfig()),
}
# (loss, correction) pairs the config accepts: a sequence-level loss takes no token-level correction
RUNS = [(loss, name) for loss in sorted(POLICY_LOSSES) for name, corrections in CORRECTIONS.items()
        if loss not in SEQUENCE_LEVEL_LOSSES or not token_level_corrections(corrections)]
_CODE_SPANS = re.compile(r"`([^`]+)`")


def micro_batch(seed: int, lengths: list[int], width: int = 10) -> dict[str, torch.Tensor]:
    """Loss inputs [B, width]: log-ratios of ~0.05 with one token of sequence 0 off by 1 (TRM rejects it)."""
    generator = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    old = -torch.rand(rows, width, generator=generator)
    rollout = old + 0.05 * torch.randn(rows, width, generator=generator)
    rollout[0, 0] += 1.0
    advantages = torch.randn(rows, 1, generator=generator).expand(rows, width).contiguous()
    return {"log_prob": old + 0.05 * torch.randn(rows, width, generator=generator), "old_log_prob": old,
            "advantages": advantages, "response_mask": mask, "rollout_log_prob": rollout,
            "entropy": torch.rand(rows, width, generator=generator)}


MICRO_BATCHES = [micro_batch(0, [1, 3, 10, 6]), micro_batch(1, [2, 9, 5, 4])]


@pytest.fixture(scope="module")
def loss_runs() -> dict[tuple[str, str], dict[str, str]]:
    """(loss, correction) -> {logged name: its reduction}, combined as the learner combines a mini-batch."""
    masks = [mb["response_mask"] for mb in MICRO_BATCHES]
    counts = GlobalCounts(tokens=float(sum(m.sum() for m in masks)),
                          sequences=float(sum((m.sum(-1) > 0).sum() for m in masks)))
    runs = {}
    with single_process_megatron(0):
        for loss, correction in RUNS:
            config = PolicyLossConfig(corrections=CORRECTIONS[correction])
            reports, reductions = [], {}
            for index, mb in enumerate(MICRO_BATCHES):
                value, metrics = compute_policy_loss(loss, **mb, config=config, step_counts=counts)
                mask = mb["response_mask"]
                accumulated = accumulate(metrics, float(mask.sum()), float((mask.sum(-1) > 0).sum()))
                reports.append({"index": index, "loss": value.item(), "metrics": accumulated})
                reductions.update(metrics.reductions)
            _, logged = _step_loss_and_metrics(reports)
            assert all(name.startswith("train/") for name in logged), sorted(logged)
            runs[loss, correction] = {name: reductions[name.removeprefix("train/")] for name in logged}
    return runs


@functools.cache
def trainer_literals() -> frozenset[str]:
    """The metric names written as string literals in TRAINER_SOURCES (asserting none is an f-string)."""
    names = set()
    for source in TRAINER_SOURCES:
        tree = ast.parse((ROOT / source).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith(METRIC_PREFIXES) and not re.search(r"\s", node.value):
                names.add(node.value)
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                assert not str(node.values[0].value).startswith(METRIC_PREFIXES), \
                    f"{source}: a metric name built at run time, {ast.unparse(node)}: this test cannot see it"
    return frozenset(names)


def jsonl_fields(tmp_path: Path) -> set[str]:
    """The keys of a JSONL line besides the metrics, from `tracking._write_line` with a non-finite value."""
    values = {"train/loss": math.nan}
    with open(tmp_path / "metrics.jsonl", "w") as file:
        _write_line(file, 1, values)
    return set(json.loads((tmp_path / "metrics.jsonl").read_text())) - set(values)


def test_every_loss_metric_is_documented_with_its_reductions(loss_runs):
    documented = documented_metrics()
    undocumented = {name: run for run, logged in loss_runs.items() for name in logged
                    if not is_documented(name, documented)}
    assert not undocumented, f"loss metrics missing from docs/metrics.md (name: a run logging it): {undocumented}"
    seen: dict[str, set[str]] = {}
    for logged in loss_runs.values():
        for name, reduction in logged.items():
            for pattern in documented:
                if name_pattern(pattern).match(name):
                    seen.setdefault(pattern, set()).add(reduction)
    wrong = []
    for pattern, reductions in sorted(seen.items()):
        cell = documented[pattern]["combined"]
        spans = set(_CODE_SPANS.findall(cell))
        assert spans <= set(REDUCTIONS), f"{pattern}: `combined` cell {cell!r} names no reduction of {REDUCTIONS}"
        if spans != reductions:
            wrong.append(f"{pattern}: documented {sorted(spans)}, the code {sorted(reductions)}")
    assert not wrong, "\n".join(wrong)


def test_the_trainers_own_metrics_are_documented():
    assert "train/loss" in trainer_literals() and "sync/seconds" in trainer_literals()
    missing = sorted(trainer_literals() - set(documented_metrics()))
    assert not missing, f"trainer metrics missing from docs/metrics.md: {missing}"


def test_the_jsonl_fields_are_the_documented_names_without_a_prefix(tmp_path):
    fields = jsonl_fields(tmp_path)
    assert fields == {name for name in documented_metrics() if not name.startswith(METRIC_PREFIXES)}
    assert "nonfinite" in fields


def test_every_documented_metric_is_logged(loss_runs, tmp_path):
    """No documented name is stale: each is a trainer literal, a JSONL field or a name some loss run logs."""
    logged = {name for names in loss_runs.values() for name in names}
    covered = trainer_literals() | jsonl_fields(tmp_path)
    stale = [pattern for pattern in documented_metrics()
             if pattern not in covered and not any(name_pattern(pattern).match(name) for name in logged)]
    assert not stale, f"documented in docs/metrics.md but logged by nothing: {stale}"

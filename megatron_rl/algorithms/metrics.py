"""Loss metrics that know how to combine across micro-batches and ranks.

Each value is a detached 0-dim tensor for one batch; `reductions[name]` says how the values of
several batches (micro-batches, data-parallel ranks) make the value of their union:
- "token": a mean over response tokens (weight each batch by its token count);
- "sequence": a mean over non-empty sequences (weight by the sequence count);
- "weighted": a mean with its own weight (`Metrics.weights`, e.g. the number of token pairs or
  of sequences in a length bucket): sum_b value_b w_b / sum_b w_b;
- "max" / "min": the extreme; "sum": the total;
- "quantile": a quantile of per-sequence values (`Metrics.pools`: the batch's values and the
  level); the pools of the batches are joined and the quantile is taken of the union, so it is
  exact (quantiles of parts do not combine into the quantile of the whole);
- "derived": recomputed from the combined values of others (`DERIVED`).
"""

import math
from collections.abc import Sequence

import torch

from megatron_rl.algorithms.trm import trm_bounds

REDUCTIONS = ("token", "sequence", "weighted", "max", "min", "sum", "quantile", "derived")


def quantile(values: Sequence[float], level: float) -> float:
    """The level-quantile of values (not empty), linear between order statistics (numpy's default):
    with x the sorted values and h = (n - 1) level, x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])."""
    x = sorted(float(v) for v in values)
    h = (len(x) - 1) * level
    low = math.floor(h)
    return x[low] + (h - low) * (x[min(low + 1, len(x) - 1)] - x[low])


def _variance(mean: str, sq_mean: str, name: str, root: bool = False):
    """E[v^2] - E[v]^2 (clamped at 0) from two token means, as `name`; its square root if root."""
    def formula(first: float, second: float) -> dict[str, float]:
        variance = max(second - first**2, 0.0)
        return {name: math.sqrt(variance) if root else variance}

    return (mean, sq_mean), formula


def _phi_ess(mean: float, sq_mean: float) -> dict[str, float]:
    """VESPO's effective sample size of phi over the sequences, (mean phi)^2 / mean phi^2."""
    return {"vespo/phi_ess": mean**2 / max(sq_mean, 1e-30)}


def _trm_bounds(prefix: str):
    """TRM's bounds (ALGORITHMS.md 4.2) on the accepted sequences, from sample estimates: delta =
    their largest max_t k2, D_KL^seq = their mean sum_t k3, T = their longest length."""
    def bounds(delta: float, longest: float, kl_seq_sum: float, accepted: float) -> dict[str, float]:
        if delta <= 0 or accepted == 0:
            return {}
        found = trm_bounds(int(longest), float(delta), d_kl_seq=float(kl_seq_sum) / float(accepted))
        return {f"{prefix}/bound_{name}": value for name, value in found.items()}

    inputs = tuple(f"{prefix}/{key}" for key in ("accepted_max_k2", "accepted_max_length",
                                                 "accepted_kl_seq_sum", "accepted_count"))
    return inputs, bounds


# (the metrics a group needs, the function giving the group's metrics from their values)
DERIVED = [(("vespo/phi_mean", "vespo/phi_sq_mean"), _phi_ess), _trm_bounds("trm"), _trm_bounds("trm_mask"),
           _variance("kpo/z_mean", "kpo/z_sq_mean", "kpo/z_var"),
           _variance("kpo/x_hat_mean", "kpo/x_hat_sq_mean", "kpo/x_hat_var"),
           _variance("kpo/x_hat_abs_mean", "kpo/x_hat_sq_mean", "kpo/x_hat_abs_std", root=True)]


def add_derived(values: dict) -> dict:
    """values plus every DERIVED metric whose inputs are present (floats or 0-dim tensors)."""
    for inputs, formula in DERIVED:
        if all(key in values for key in inputs):
            values.update(formula(*(float(values[key]) for key in inputs)))
    return values


class Metrics(dict[str, torch.Tensor]):
    """name -> detached 0-dim tensor, plus `reductions`: name -> one of REDUCTIONS, and what the
    "weighted" and "quantile" metrics combine by: `weights` (name -> 0-dim weight) and `pools`
    (name -> (1-D per-sequence values, level))."""

    def __init__(self):
        super().__init__()
        self.reductions: dict[str, str] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.pools: dict[str, tuple[torch.Tensor, float]] = {}

    def add(self, reduction: str, values: dict[str, torch.Tensor]) -> "Metrics":
        if reduction not in REDUCTIONS or reduction in ("weighted", "quantile"):
            raise ValueError(f"reduction must be one of {REDUCTIONS} (weighted: add_weighted, quantile: "
                             f"add_quantiles), got {reduction!r}")
        return self._set(reduction, values)

    def _set(self, reduction: str, values: dict[str, torch.Tensor]) -> "Metrics":
        for name, value in values.items():
            self[name] = value.detach()
            self.reductions[name] = reduction
        return self

    def add_weighted(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> "Metrics":
        """name -> (sum, weight): the metric sum / weight (0 when the weight is 0), combined over
        batches as the sum of their sums over the sum of their weights."""
        for name, (total, weight) in values.items():
            positive = weight > 0
            self._set("weighted", {name: torch.where(positive, total, 0.0) / torch.where(positive, weight, 1.0)})
            self.weights[name] = weight.detach()
        return self

    def add_quantiles(self, name: str, values: torch.Tensor, levels: Sequence[float]) -> "Metrics":
        """f"{name}_p{100 level}" for each level: the `quantile` of the 1-D values (nothing when
        values is empty); over several batches, the quantile of all their values."""
        if not values.numel():
            return self
        pool = values.detach().flatten().to(torch.float64)
        host = pool.tolist()
        for level in levels:
            key = f"{name}_p{round(100 * level)}"
            self._set("quantile", {key: torch.tensor(quantile(host, level), dtype=torch.float64)})
            self.pools[key] = (pool, level)
        return self

    def with_derived(self) -> "Metrics":
        for name, value in add_derived(dict(self)).items():
            if name not in self:
                self._set("derived", {name: torch.tensor(float(value), dtype=torch.float64)})
        return self

    def merge(self, other: "Metrics") -> "Metrics":
        for name, value in other.items():
            self._set(other.reductions[name], {name: value})
        self.weights.update(other.weights)
        self.pools.update(other.pools)
        return self


# name -> (reduction, value / weighted sum / pooled values, weight / quantile level)
Accumulated = dict[str, tuple[str, float | tuple[float, ...], float]]
_JOINS = {"max": max, "min": min, "sum": lambda a, b: a + b, "quantile": lambda a, b: a + b}  # pools: concatenated
weights_by_count = ("token", "sequence", "weighted")


def accumulate(metrics: Metrics, tokens: float, sequences: float) -> Accumulated:
    """One batch's metrics, its response-token and non-empty-sequence counts, as an Accumulated:
    means become (value x weight, weight); quantiles (the batch's values, level); extremes and
    sums keep their value (weight 1)."""
    weights = {"token": tokens, "sequence": sequences}
    out: Accumulated = {}
    for name, value in metrics.items():
        reduction = metrics.reductions[name]
        if reduction == "quantile":
            pool, level = metrics.pools[name]
            out[name] = (reduction, tuple(pool.tolist()), level)
        elif reduction != "derived":
            weight = float(metrics.weights[name]) if reduction == "weighted" else weights.get(reduction, 1.0)
            out[name] = (reduction, float(value) * weight, weight)
    return out


def combine(accumulations: list[Accumulated]) -> Accumulated:
    """The Accumulated of the union of several batches (a batch lacking a metric does not count)."""
    out: Accumulated = {}
    for accumulated in accumulations:
        for name, (reduction, total, weight) in accumulated.items():
            if name not in out:
                out[name] = (reduction, total, weight)
            elif reduction in weights_by_count:
                out[name] = (reduction, out[name][1] + total, out[name][2] + weight)
            else:
                out[name] = (reduction, _JOINS[reduction](out[name][1], total), weight)
    return out


def finalize(accumulated: Accumulated) -> dict[str, float]:
    """The value of every metric of the union, derived metrics included."""
    values = {}
    for name, (reduction, total, weight) in accumulated.items():
        if reduction == "quantile":
            values[name] = quantile(total, weight)
        else:
            values[name] = total / weight if reduction in weights_by_count and weight else total
    return add_derived(values)

"""Loss metrics that know how to combine across micro-batches and ranks.

Each value is a detached 0-dim tensor for one batch; `reductions[name]` says how the values of
several batches (micro-batches, data-parallel ranks) make the value of their union:
- "token": a mean over response tokens (weight each batch by its token count);
- "sequence": a mean over non-empty sequences (weight by the sequence count);
- "max" / "min": the extreme; "sum": the total;
- "derived": recomputed from the combined values of others (`DERIVED`).
"""

import torch

from megatron_rl.algorithms.trm import trm_bounds

REDUCTIONS = ("token", "sequence", "max", "min", "sum", "derived")



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
DERIVED = [(("vespo/phi_mean", "vespo/phi_sq_mean"), _phi_ess), _trm_bounds("trm"), _trm_bounds("trm_mask")]


def add_derived(values: dict) -> dict:
    """values plus every DERIVED metric whose inputs are present (floats or 0-dim tensors)."""
    for inputs, formula in DERIVED:
        if all(key in values for key in inputs):
            values.update(formula(*(float(values[key]) for key in inputs)))
    return values


class Metrics(dict[str, torch.Tensor]):
    """name -> detached 0-dim tensor, plus `reductions`: name -> one of REDUCTIONS."""

    def __init__(self):
        super().__init__()
        self.reductions: dict[str, str] = {}

    def add(self, reduction: str, values: dict[str, torch.Tensor]) -> "Metrics":
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        for name, value in values.items():
            self[name] = value.detach()
            self.reductions[name] = reduction
        return self

    def with_derived(self) -> "Metrics":
        for name, value in add_derived(dict(self)).items():
            if name not in self:
                self.add("derived", {name: torch.tensor(float(value), dtype=torch.float64)})
        return self

    def merge(self, other: "Metrics") -> "Metrics":
        for name, value in other.items():
            self.add(other.reductions[name], {name: value})
        return self


Accumulated = dict[str, tuple[str, float, float]]  # name -> (reduction, value or weighted sum, weight)
_EXTREMES = {"max": max, "min": min, "sum": lambda a, b: a + b}
weights_by_count = ("token", "sequence")


def accumulate(metrics: Metrics, tokens: float, sequences: float) -> Accumulated:
    """One batch's metrics, its response-token and non-empty-sequence counts, as an Accumulated:
    means become (value x weight, weight); extremes and sums keep their value (weight 1)."""
    weights = {"token": tokens, "sequence": sequences}
    out: Accumulated = {}
    for name, value in metrics.items():
        reduction = metrics.reductions[name]
        if reduction != "derived":
            weight = weights.get(reduction, 1.0)
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
                out[name] = (reduction, _EXTREMES[reduction](out[name][1], total), 1.0)
    return out


def finalize(accumulated: Accumulated) -> dict[str, float]:
    """The value of every metric of the union, derived metrics included."""
    values = {name: total / weight if reduction in weights_by_count and weight else total
              for name, (reduction, total, weight) in accumulated.items()}
    return add_derived(values)

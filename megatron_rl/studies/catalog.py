"""The studies of `megatron-rl study NAME`, by name (ALGORITHMS.md 6: the small-scale reproduction anchors)."""

from megatron_rl.studies import smoothing, staleness, trust_region
from megatron_rl.studies.study import Study

STUDIES: dict[str, Study] = {study.name: study for study in (staleness.STUDY, smoothing.STUDY, trust_region.STUDY)}

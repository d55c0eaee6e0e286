"""The Megatron-Core learner.

Importing any module of this package first prepares the platform
(megatron_rl.platform.ensure_platform: on a machine without a GPU, the CPU patches, process-wide),
so the modules here may import Megatron-Core at their top.
"""

from megatron_rl.platform import ensure_platform

ensure_platform()

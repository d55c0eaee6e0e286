"""Peak extra resident memory of a function, on Linux, for the CPU benchmarks.

Run the measured code in a fresh process started with `MALLOC_MMAP_THRESHOLD_` low (see
`fresh_process_env`): every large block is then mmapped and returned to the OS when freed, so
the resident set follows the live tensors. The peak is read from VmHWM after resetting it
(`/proc/self/clear_refs` <- 5), relative to VmRSS just before the call.
"""

import os


def fresh_process_env() -> dict[str, str]:
    """Environment for the measuring subprocess: blocks >= 64 KiB are mmapped, freed eagerly."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """MiB of resident memory fn() used at its peak above what was resident when it started."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024

#!/usr/bin/env bash
# RL training on one machine: torchrun starts one learner process per rank, and rank 0 launches the
# engines of rollout.engines that have launch: true (or attaches to running ones, launch: false).
#
#   launch/local.sh CONFIG [key=value ...]
#
# Environment: PYTHON (an interpreter with megatron_rl installed; default: this repository's .venv,
# else python3), NPROC (learner processes; default parallel.world_size of the config).
# SIGUSR1 to this script: the learners save a checkpoint after the step in progress and exit with 138
# (which torchrun reports as a failure: it exits 1); run again with checkpoint.resume=auto (the default)
# to continue. SIGTERM / SIGINT stop at once.
set -uo pipefail
CONFIG=${1:?usage: local.sh CONFIG [key=value ...]}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON=$HERE/../.venv/bin/python; else PYTHON=python3; fi
fi
NPROC=${NPROC:-$("$PYTHON" "$HERE/config_value.py" parallel.world_size "$@")} || exit 2

# SIGUSR1 is ignored until the trainer installs its handler (else it would kill a starting rank)
(trap '' USR1; exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
   -m megatron_rl.cli train "$@") &
launcher=$!
to_rank0() {  # pass SIGUSR1 to torchrun's worker of rank 0 only (torchrun itself does not forward it)
  echo "local.sh: SIGUSR1 passed on to learner rank 0: checkpoint after the step in progress, then stop" >&2
  for pid in $(ps -o pid= --ppid "$launcher"); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx 'RANK=0'; then kill -USR1 "$pid"; fi
  done
}
trap to_rank0 USR1
trap 'kill -TERM "$launcher"' TERM INT
while true; do  # `wait` returns early when a trap runs; repeat until torchrun is gone
  wait "$launcher"
  kill -0 "$launcher" 2>/dev/null || break
done
wait "$launcher"

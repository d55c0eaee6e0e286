#!/usr/bin/env bash
# Submit rl.sbatch as a heterogeneous job sized from the run config and the environment; prints the job id.
#
#   launch/slurm/submit.sh CONFIG [key=value ...]
#   GPUS_PER_NODE=8 LEARNER_NODES=4 ROLLOUT_NODES=2 PARTITION=gpu TIME_LIMIT=24:00:00 \
#     launch/slurm/submit.sh configs/qwen3_8b_kpo.yaml
#
# Environment [default]:
#   PYTHON              interpreter with megatron_rl installed [this repository's .venv, else python3]
#   LEARNER_NODES [1]
#   ROLLOUT_NODES       [the number of distinct hosts in rollout.engines: one node each, rollout_engines.py]
#   GPUS_PER_NODE       GPUs per node of both components [0: CPU nodes, no --gpus-per-node]
#   LEARNER_TASKS_PER_NODE  learner ranks per node [GPUS_PER_NODE; on CPU nodes parallel.world_size /
#                       LEARNER_NODES]; LEARNER_NODES x this must equal parallel.world_size
#   CPUS_PER_TASK [1]   CPUs of each learner rank;  ROLLOUT_CPUS [1] CPUs of each rollout node's task
#   PARTITION, ROLLOUT_PARTITION [PARTITION]; without them Slurm's default partition (or SBATCH_PARTITION)
#   TIME_LIMIT          sbatch --time [the partition's default]
#   STOP_LEAD [300]     seconds before the time limit at which the learners checkpoint and the job requeues;
#                       more than one training step plus a checkpoint save, plus 30 s: Slurm checks time
#                       limits about every 30 s (measured: asked for 50 s before the limit, signalled at 31 s)
#   JOB_OUTPUT [slurm-%j.out], appended to across requeues
#   SBATCH_ARGS, LEARNER_SBATCH_ARGS, ROLLOUT_SBATCH_ARGS  more sbatch options for both / one component
#                       (--account=..., --qos=..., --constraint=..., --exclusive, --nodelist=...)
# Passed on to the job: PYTHON, LAUNCH_DIR and everything rl.sbatch reads (MASTER_PORT, ROLLOUT_BIND_HOST).
set -euo pipefail
CONFIG=${1:?usage: submit.sh CONFIG [key=value ...]}
HERE=$(cd "$(dirname "$0")" && pwd)
export LAUNCH_DIR=$(dirname "$HERE")
REPO=$(dirname "$LAUNCH_DIR")
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON

world_size=$("$PYTHON" "$LAUNCH_DIR/config_value.py" parallel.world_size "$@")
rollout_nodes=${ROLLOUT_NODES:-$("$PYTHON" "$HERE/rollout_engines.py" nodes "$@")}
learner_nodes=${LEARNER_NODES:-1}
gpus=${GPUS_PER_NODE:-0}
if [ "$gpus" -gt 0 ]; then tasks_per_node=${LEARNER_TASKS_PER_NODE:-$gpus}
else tasks_per_node=${LEARNER_TASKS_PER_NODE:-$((world_size / learner_nodes))}; fi
if [ $((learner_nodes * tasks_per_node)) != "$world_size" ]; then
  echo "submit.sh: LEARNER_NODES=$learner_nodes x $tasks_per_node tasks per node is not parallel.world_size" \
       "= $world_size; change LEARNER_NODES / LEARNER_TASKS_PER_NODE or parallel.world_size" >&2
  exit 2
fi

common=(${SBATCH_ARGS:-})
[ -z "${TIME_LIMIT:-}" ] || common+=("--time=$TIME_LIMIT")
[ "$gpus" = 0 ] || common+=("--gpus-per-node=$gpus")
learner=("--nodes=$learner_nodes" "--ntasks-per-node=$tasks_per_node" "--cpus-per-task=${CPUS_PER_TASK:-1}"
         "--signal=B:USR1@${STOP_LEAD:-300}" "--output=${JOB_OUTPUT:-slurm-%j.out}" "${common[@]}"
         ${LEARNER_SBATCH_ARGS:-})
rollout=("--nodes=$rollout_nodes" "--ntasks-per-node=1" "--cpus-per-task=${ROLLOUT_CPUS:-1}" "${common[@]}"
         ${ROLLOUT_SBATCH_ARGS:-})
[ -z "${PARTITION:-}" ] || learner+=("--partition=$PARTITION")
partition=${ROLLOUT_PARTITION:-${PARTITION:-}}
[ -z "$partition" ] || rollout+=("--partition=$partition")

timeout 120 sbatch --parsable "${learner[@]}" : "${rollout[@]}" "$HERE/rl.sbatch" "$@"

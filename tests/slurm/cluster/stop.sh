#!/usr/bin/env bash
# Stop the cluster of start.sh RUNDIR: cancel its jobs, then stop each daemon by its PID file (slurmd
# first, while slurmctld still answers them; then slurmctld, then munged), SIGKILL after 20 s; remove
# the network namespaces, the bridge and the /etc/hosts lines. Safe to run twice or on a half-started one.
set -uo pipefail
RUNDIR=${1:?usage: stop.sh RUNDIR}
NODES=$(cat "$RUNDIR/nodes" 2>/dev/null || echo 0)
TAG="# megatron-rl slurm test cluster"
export SLURM_CONF="$RUNDIR/slurm.conf"

if [ -f "$SLURM_CONF" ] && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    timeout 10 scancel --full $jobs 2>/dev/null
    for _ in $(seq 120); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi

stop_pid() {  # stop_pid PIDFILE
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  echo "$1: pid $pid ignored SIGTERM for 20 s; SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null
}
for pidfile in "$RUNDIR"/run/slurmd-*.pid; do stop_pid "$pidfile" & done
wait
stop_pid "$RUNDIR/run/slurmctld.pid"
stop_pid "$RUNDIR/run/munged.pid"

for i in $(seq "$NODES"); do
  ip netns del "mrl-node$i" 2>/dev/null
  ip link del "mrl-v$i" 2>/dev/null
done
ip link del mrl-br0 2>/dev/null
if grep -q "$TAG\$" /etc/hosts; then
  hosts=$(grep -v "$TAG\$" /etc/hosts)
  echo "$hosts" > /etc/hosts
fi
exit 0

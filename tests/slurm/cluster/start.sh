#!/usr/bin/env bash
# A throw-away Slurm 22.05 cluster on this machine: munged + slurmctld + one slurmd per node.
#
#   start.sh RUNDIR [NODES=2]      then: export SLURM_CONF=RUNDIR/slurm.conf;  stop with stop.sh RUNDIR
#
# Node i ("node<i>") is a slurmd in its own network namespace (mrl-node<i>, address $SUBNET.<10+i> on
# bridge mrl-br0, whose $SUBNET.1 is this machine) and its own UTS namespace (hostname node<i>), so every
# node has its own port space and gloo / torchrun advertise an address the other nodes reach.
# Needs root (munged, slurmd, ip netns, /etc/hosts). Installs Debian's slurm + munge packages if missing.
# Everything lives under RUNDIR (config, state, logs, PID files, munge key and socket); stop.sh stops
# each daemon by its PID file. Call stop.sh even when this script fails: daemons it started keep running.
#
# Environment: SUBNET (10.198.0), SLURMCTLD_PORT (6817), SLURMD_PORT (6818), KILL_WAIT (30 s between
# SIGTERM and SIGKILL when a job is cancelled or requeued), CRED_EXPIRE (15 s, see below).
set -euo pipefail
RUNDIR=${1:?usage: start.sh RUNDIR [NODES]}; NODES=${2:-2}
SUBNET=${SUBNET:-10.198.0}
HERE=$(cd "$(dirname "$0")" && pwd)
TAG="# megatron-rl slurm test cluster"

missing=0
for command in slurmctld slurmd sbatch munged ip nsenter unshare; do command -v "$command" >/dev/null || missing=1; done
if [ $missing = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >"$RUNDIR.apt.log" 2>&1 || { tail -5 "$RUNDIR.apt.log" >&2; exit 1; }
  timeout 600 apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge iproute2 \
    util-linux >>"$RUNDIR.apt.log" 2>&1 || { tail -5 "$RUNDIR.apt.log" >&2; exit 1; }
fi

"$HERE/stop.sh" "$RUNDIR" >/dev/null 2>&1 || true   # leftovers of a run that was killed
rm -rf "$RUNDIR"
mkdir -p "$RUNDIR"/{state,log,run,munge}
for i in $(seq "$NODES"); do mkdir -p "$RUNDIR/spool/node$i"; done
chmod 755 "$RUNDIR" "$RUNDIR/munge"   # munged wants every directory above its socket world-executable
echo "$NODES" > "$RUNDIR/nodes"

# munge: a private key and socket (nothing in /etc or /run)
head -c 1024 /dev/urandom > "$RUNDIR/munge/munge.key"
chmod 400 "$RUNDIR/munge/munge.key"
munged --key-file="$RUNDIR/munge/munge.key" --socket="$RUNDIR/munge/munge.sock" --pid-file="$RUNDIR/run/munged.pid" \
       --log-file="$RUNDIR/log/munged.log" --seed-file="$RUNDIR/munge/munged.seed"

# the nodes: a bridge in this namespace, a veth into each node's network namespace
ip link add mrl-br0 type bridge
ip addr add "$SUBNET.1/24" dev mrl-br0
ip link set mrl-br0 up
for i in $(seq "$NODES"); do
  ip netns add "mrl-node$i"
  ip link add "mrl-v$i" type veth peer name "mrl-v${i}p"
  ip link set "mrl-v${i}p" netns "mrl-node$i"
  ip link set "mrl-v$i" master mrl-br0 up
  ip -n "mrl-node$i" link set lo up
  ip -n "mrl-node$i" link set "mrl-v${i}p" name eth0
  ip -n "mrl-node$i" addr add "$SUBNET.$((10 + i))/24" dev eth0
  ip -n "mrl-node$i" link set eth0 up
done
# node names resolve everywhere (launch scripts use them as MASTER_ADDR and engine hosts).
# /etc/hosts is rewritten in place, not replaced: it may be a bind mount.
hosts=$(grep -v "$TAG\$" /etc/hosts)
{ echo "$hosts"; for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) node$i $TAG"; done; } > /etc/hosts

memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / NODES / 2 ))
cat > "$RUNDIR/slurm.conf" <<CONF
# a local test cluster (tests/slurm/cluster/start.sh); not for production
ClusterName=mrltest
SlurmctldHost=$(hostname -s)($SUBNET.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it starts again (default 120 s); a restart on nodes
# that still hold the revoked credential of its last run fails ("Job credential revoked")
AuthInfo=socket=$RUNDIR/munge/munge.sock,cred_expire=${CRED_EXPIRE:-15}
MpiDefault=none
# no systemd or delegated cgroups here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# heterogeneous jobs are started by the backfill loop only: its default 30 s interval delays every one
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$RUNDIR/state
SlurmdSpoolDir=$RUNDIR/spool/%n
SlurmctldPidFile=$RUNDIR/run/slurmctld.pid
SlurmdPidFile=$RUNDIR/run/slurmd-%n.pid
SlurmctldLogFile=$RUNDIR/log/slurmctld.log
SlurmdLogFile=$RUNDIR/log/slurmd-%n.log
MessageTimeout=10
InactiveLimit=0
KillWait=${KILL_WAIT:-30}
MinJobAge=600
CONF
for i in $(seq "$NODES"); do
  echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$(nproc) RealMemory=$memory State=UNKNOWN"
done >> "$RUNDIR/slurm.conf"
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$RUNDIR/slurm.conf"
export SLURM_CONF="$RUNDIR/slurm.conf"

slurmctld -f "$SLURM_CONF" -c   # daemonizes; -c: no state from an earlier cluster
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
timeout 5 scontrol ping | grep -q UP || { tail -5 "$RUNDIR/log/slurmctld.log" >&2; exit 1; }
for i in $(seq "$NODES"); do
  # nsenter, not `ip netns exec`, which remounts /sys: slurmd 22.05 then finds no /sys/fs/cgroup and exits
  nsenter --net="/run/netns/mrl-node$i" unshare --uts \
    sh -c "hostname node$i && exec slurmd -f '$SLURM_CONF' -N node$i"
done
idle=0
for _ in $(seq 120); do
  idle=$(timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$' || true)
  [ "$idle" = "$NODES" ] && break
  sleep 0.25
done
[ "$idle" = "$NODES" ] || { timeout 5 sinfo -N -l >&2 || true; echo "nodes not idle; logs in $RUNDIR/log" >&2; exit 1; }
echo "slurm test cluster up: $NODES nodes, SLURM_CONF=$SLURM_CONF"

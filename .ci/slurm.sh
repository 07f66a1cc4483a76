#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests/test_slurm.py, and its teardown.
#
#   .ci/slurm.sh up STATE     install (Debian, as root), configure and start munged,
#                             slurmctld and slurmd; wait until the node is idle
#   .ci/slurm.sh down STATE   stop every daemon it started, by PID
#
# Everything lives in STATE: slurm.conf, spool folders, logs, PID files. When SLURM cannot
# be set up (no apt, not root, a daemon does not come up), `up` writes the reason to
# STATE/skip-reason and exits 0: the test then skips and prints that reason. CI machines
# have no systemd, so the daemons are started directly, in the foreground, in background.
set -uo pipefail
command=${1:?usage: slurm.sh up|down STATE}
state=${2:?usage: slurm.sh up|down STATE}
mkdir -p "$state"

skip() {
    echo "$*" > "$state/skip-reason"
    echo "slurm: not available: $*" >&2
    exit 0
}

down() {
    for daemon in slurmd slurmctld munged; do
        [ -f "$state/$daemon.pid" ] || continue
        pid=$(cat "$state/$daemon.pid")
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        rm -f "$state/$daemon.pid"
    done
}

start() {  # start NAME COMMAND...: run in the foreground of a background job, keep its PID
    local name=$1
    shift
    "$@" > "$state/logs/$name.out" 2>&1 &
    echo $! > "$state/$name.pid"
}

up() {
    [ "$(id -u)" = 0 ] || skip "not root: installing and running SLURM daemons needs root"
    if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null \
        || ! command -v sbatch > /dev/null || ! command -v munged > /dev/null; then
        command -v apt-get > /dev/null || skip "no apt-get to install slurm and munge"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } \
            > "$state/apt.log" 2>&1 || skip "apt-get install slurm failed (see $state/apt.log)"
    fi
    mkdir -p "$state/logs" "$state/ctld" "$state/d" /run/munge
    chown munge:munge /run/munge 2>/dev/null
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1 | sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/")
    cat > "$state/slurm.conf" <<CONF
ClusterName=swlens
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/ctld/slurmctld.pid
SlurmdPidFile=$state/d/slurmd.pid
SlurmctldLogFile=$state/logs/slurmctld.log
SlurmdLogFile=$state/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=5
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$state/slurm.conf"
    start munged munged --foreground --force
    sleep 0.5
    start slurmctld slurmctld -D -c -f "$SLURM_CONF"
    start slurmd slurmd -D -f "$SLURM_CONF"
    for _ in $(seq 120); do
        if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
            echo "slurm: node $host idle (SLURM_CONF=$SLURM_CONF)" >&2
            return 0
        fi
        sleep 0.5
    done
    tail -n 5 "$state"/logs/* >&2
    down
    skip "the SLURM node did not become idle within 60 s (logs in $state/logs)"
}

case $command in
    up) up ;;
    down) down ;;
    *) echo "usage: slurm.sh up|down STATE" >&2; exit 2 ;;
esac

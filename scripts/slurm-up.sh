#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, to try `[parallelism] launcher = "slurm"`
# (and for CI's tests/slurm.rs). Debian / Ubuntu, as root, no systemd needed.
#
#   scripts/slurm-up.sh          # install (first time), configure, start; waits until the node is idle
#   scripts/slurm-up.sh --stop   # stop the daemons (configuration and packages stay)
#
# It installs Debian's `slurm-wlm` and `munge` when missing, writes /etc/slurm/slurm.conf for
# this host (its short hostname, `nproc` CPUs, 90 % of its memory; one partition `debug`), starts
# munged, slurmctld and slurmd directly (no init system), and waits until `sinfo` shows the node
# idle. Process tracking is proctrack/pgid and task/none, so no cgroup setup is needed.
# Idempotent: when the cluster already answers and the node is idle, it returns at once.
# It refuses to overwrite a slurm.conf it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# Written by evomerge scripts/slurm-up.sh"
LOG_DIR=/var/log/slurm
STATE=/var/lib/slurm

say() { echo "slurm-up: $*" >&2; }

# The daemons are found by their pid files, never by name.
PIDFILES=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)

running() { # running PIDFILE: the daemon of that pid file is alive (a zombie is not)
    [[ -s $1 ]] || return 1
    local state
    state=$(awk '{ print $3 }' "/proc/$(cat "$1" 2>/dev/null)/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

stop() {
    for f in "${PIDFILES[@]}"; do
        if running "$f"; then
            say "stopping $(basename "$f" .pid) (pid $(cat "$f"))"
            kill "$(cat "$f")" || true
            for _ in $(seq 50); do
                running "$f" || break
                sleep 0.1
            done
        fi
    done
}

if [[ ${1:-} == --stop ]]; then
    stop
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    say "run as root (it installs packages and starts daemons)"
    exit 1
fi

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n1; }

print_stop() {
    say "ready: $(sinfo -h -N -o '%N %t %c CPUs %m MB' 2>/dev/null | head -n1)"
    say "stop it with: $0 --stop"
}

# Quick path: everything already up.
if command -v sinfo >/dev/null && running /run/slurmd.pid && scontrol ping >/dev/null 2>&1 &&
    [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]; then
    print_stop
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null ||
    ! command -v srun >/dev/null; then
    say "installing slurm-wlm and munge"
    apt-get update -qq
    # No service starts during the install (this script starts them, with its configuration).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)

if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script; not touching it"
    exit 1
fi
mkdir -p /etc/slurm "$LOG_DIR" "$STATE/slurmctld" "$STATE/slurmd"
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
$MARK: a single-node test cluster.
ClusterName=evomerge
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: jobs tracked by process group (a job step's processes share one, so a cancel
# also kills a child its shell left behind), no task containment.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Jobs past their time limit are killed 5 s after SIGTERM; finished jobs stay visible to
# squeue --states=all for 5 minutes (how evomerge tells a timeout from a failure).
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$CONF" 2>/dev/null; then
    say "writing $CONF ($host, $cpus CPUs, $mem_mb MB)"
    install -m 644 "$new_conf" "$CONF"
    # A changed configuration needs fresh daemons.
    stop
    sleep 1
fi
rm -f "$new_conf"

if ! running /run/munge/munged.pid; then
    say "starting munged"
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null || { say "munged does not answer"; exit 1; }

if ! running /run/slurmctld.pid; then
    say "starting slurmctld (log: $LOG_DIR/slurmctld.log)"
    # -c: a fresh queue (a throwaway test cluster keeps no jobs across restarts).
    slurmctld -c
fi
for _ in $(seq 100); do
    scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
done
if ! scontrol ping >/dev/null 2>&1; then
    say "slurmctld does not answer; its log:"
    tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true
    exit 1
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd (log: $LOG_DIR/slurmd.log)"
    slurmd
fi

for i in $(seq 150); do
    state=$(node_state)
    case $state in
    idle | mix | alloc) break ;;
    down* | drain* | drng*)
        # A node left down by an earlier run comes back.
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    sleep 0.2
    if ((i == 150)); then
        say "the node is not idle after 30 s (state: ${state:-none}); logs in $LOG_DIR"
        tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true
        exit 1
    fi
done
print_stop

#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests/test_slurm_cluster.py.
#
#   .ci/slurm.sh start    # install slurm-wlm + munge from Debian when missing, write slurm.conf,
#                         # start munged, slurmctld and slurmd, wait until the node is idle
#   .ci/slurm.sh stop     # stop the daemons this script started, remove its slurm.conf link
#   .ci/slurm.sh status   # sinfo, or why there is no cluster
#
# Where it cannot run a cluster (not root, no apt-get, the install fails, another cluster's
# /etc/slurm/slurm.conf is present) `start` writes the reason to $DIFFSWEEP_SLURM_DIR/unavailable
# and exits 0: the SLURM tests then skip with that reason. A cluster that was set up but does not
# come up (daemon error, node never idle) is a failure (exit 1, the daemon logs printed).
#
# The cluster: NodeName=<hostname> with CPUs=$(nproc), one partition `debug`, proctrack/linuxproc,
# task/none (no cgroups: runs in containers), no accounting (accounting_storage/none,
# jobacct_gather/none), job completions logged to a text file, SlurmUser=SlurmdUser=root, state
# and spool under $DIFFSWEEP_SLURM_DIR (default /tmp/diffsweep-slurm).
set -euo pipefail

ROOT=${DIFFSWEEP_SLURM_DIR:-/tmp/diffsweep-slurm}
CONF=$ROOT/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf       # where sbatch, sinfo, scontrol (also inside jobs) look
MARKER="# written by diffsweep .ci/slurm.sh"
UNAVAILABLE=$ROOT/unavailable
HOST=$(hostname -s)

say() { echo "[slurm.sh] $*"; }

unavailable() {  # the tests skip with this reason; not an error of this script
    { mkdir -p "$ROOT" && echo "$*" > "$UNAVAILABLE"; } 2>/dev/null || true
    say "no SLURM cluster: $*"
    exit 0
}

fail() {
    say "ERROR: $*"
    for log in "$ROOT"/log/*.log; do
        [ -f "$log" ] && { echo "----- $log"; tail -n 40 "$log"; }
    done
    exit 1
}

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && command -v sinfo >/dev/null && command -v scontrol >/dev/null
}

install_packages() {
    have_binaries && return 0
    command -v apt-get >/dev/null || unavailable "slurm-wlm/munge are not installed and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
            >"$ROOT/apt.log" 2>&1; then
        unavailable "apt-get install slurm-wlm munge failed (see $ROOT/apt.log)"
    fi
    have_binaries || unavailable "slurm-wlm was installed but slurmctld/slurmd/munged are still missing"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating the munge key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    munge_works && return 0
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0755 /run/munge
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    touch "$ROOT/munged.started"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    fail "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_conf() {
    local cpus memory
    cpus=$(nproc)
    # What slurmd detects, minus 5 %: a node configured above its real memory is drained.
    memory=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    memory=$(( ${memory:-1024} * 95 / 100 ))
    mkdir -p "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run"
    cat > "$CONF" <<EOF
$MARKER (one node, for diffsweep's SLURM tests)
ClusterName=diffsweep-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# No accounting database: sacct has nothing to report (see tests/test_slurm_cluster.py).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.log
# Short waits: a requeued job starts again within seconds.
KillWait=5
MinJobAge=30
SchedulerTimeSlice=5
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -e "$SYSTEM_CONF" ] || [ -L "$SYSTEM_CONF" ]; then
        if ! grep -qF "$MARKER" "$SYSTEM_CONF" 2>/dev/null; then
            unavailable "$SYSTEM_CONF belongs to another SLURM setup; left alone"
        fi
        rm -f "$SYSTEM_CONF"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$CONF" "$SYSTEM_CONF"
    # sacct without an accounting database only says "Slurm accounting storage is disabled"
    # (exit 1), and submitit, which polls `sacct -o JobID,State,NodeList --parsable2 -j <id>` for
    # job states, then warns on every poll and never sees a job that died without a result.
    # `sacct --completion` answers the same query from the job completion log: put this first on
    # PATH of the submitting process (tests/test_slurm_cluster.py does).
    mkdir -p "$ROOT/bin"
    cat > "$ROOT/bin/sacct" <<EOF
#!/bin/sh
$MARKER: this cluster keeps no accounting database; job states come from its completion log.
exec $(command -v sacct) --completion "\$@"
EOF
    chmod 0755 "$ROOT/bin/sacct"
}

stop_daemon() {  # stop_daemon <name>: by the pid file this script wrote
    local pidfile=$ROOT/run/$1.pid pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }

start() {
    [ "$(id -u)" = 0 ] || unavailable "starting slurmctld/slurmd/munged needs root (running as $(id -un))"
    mkdir -p "$ROOT"
    rm -f "$UNAVAILABLE"
    install_packages
    start_munge
    stop_daemon slurmd
    stop_daemon slurmctld
    rm -rf "$ROOT/state" "$ROOT/spool" "$ROOT/log/jobcomp.log"  # job ids start again at 1
    write_conf
    slurmctld -c -f "$CONF" || fail "slurmctld did not start"
    slurmd -f "$CONF" || fail "slurmd did not start"
    local state=""
    for _ in $(seq 120); do
        state=$(node_state)
        case "$state" in
            idle) say "cluster up: node $HOST idle in partition debug ($(nproc) CPUs); conf $CONF"
                  return 0 ;;
            down*|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    fail "node $HOST is not idle after 60 s (state: ${state:-no answer from slurmctld})"
}

stop() {
    if [ -f "$ROOT/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    if [ -f "$ROOT/munged.started" ]; then
        munged --stop >/dev/null 2>&1 || true
        rm -f "$ROOT/munged.started"
    fi
    if [ -L "$SYSTEM_CONF" ] && grep -qF "$MARKER" "$SYSTEM_CONF" 2>/dev/null; then
        rm -f "$SYSTEM_CONF"
    fi
    say "stopped"
}

status() {
    if [ -f "$UNAVAILABLE" ]; then
        say "no SLURM cluster: $(cat "$UNAVAILABLE")"
    else
        sinfo
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

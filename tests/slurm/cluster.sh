#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests (and for trying the sbatch scripts).
#
#   tests/slurm/cluster.sh start|stop|status
#
# Everything lives under $MEDGPT_SLURM_STATE (default /tmp/medgpt-slurm): slurm.conf, state,
# spool, logs and pid files. Clients find the cluster through SLURM_CONF=$MEDGPT_SLURM_STATE/slurm.conf,
# so an existing /etc/slurm configuration is never touched. Ports: SLURMCTLD_PORT / SLURMD_PORT
# (defaults 6817 / 6818). Needs root (it installs packages and runs the daemons as root).
set -euo pipefail

state=${MEDGPT_SLURM_STATE:-/tmp/medgpt-slurm}
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
export SLURM_CONF=$state/slurm.conf

install_packages() {
    # Debian's packages; a fresh CI machine has neither.
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        echo "cluster.sh: installing slurm-wlm and munge" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
}

start_munge() {
    # One munged per machine serves every SLURM daemon and client on it: reuse a running one.
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    [[ -f /etc/munge/munge.key ]] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
    su -s /bin/sh munge -c /usr/sbin/munged
    wait_for "munge credentials" bash -c 'munge -n | unmunge >/dev/null'
    # Only a munged started here is stopped by `stop`: its pid file is copied into the state folder
    # (munged runs as munge and may not be able to write there itself).
    cp /run/munge/munged.pid "$state/munged.pid"
}

write_conf() {
    local host cpus memory
    host=$(hostname -s)
    # The cores there are: GNU nproc reports OMP_NUM_THREADS instead when it is set (the tests set
    # it to 1 for their training processes), and a 1-CPU node cannot run a 2-task job.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # RealMemory a bit under what is free, or slurmd refuses to register the node.
    memory=$(( $(free -m | awk '/^Mem:/ {print $7}') * 9 / 10 ))
    mkdir -p "$state"/{ctld,spool,log}
    cat >"$SLURM_CONF" <<CONF
ClusterName=medgpt-test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
# No systemd or cgroups in the sandbox: track processes by parent pid, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

wait_for() {  # wait_for <what> <command...>: up to 30 s
    local what=$1; shift
    for _ in $(seq 150); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "cluster.sh: timed out waiting for $what (logs in $state/log)" >&2
    return 1
}

node_idle() {
    [[ $(sinfo --noheader --format=%t 2>/dev/null) == idle ]]
}

stop_pidfile() {  # stop the daemon named by a pid file, if it is still running
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
}

case ${1:-} in
    start)
        install_packages
        mkdir -p "$state"
        start_munge
        write_conf
        # -c: a clean start, no jobs left over from an earlier cluster in the same folder.
        slurmctld -c
        slurmd -c
        wait_for "the node to be idle (sinfo)" node_idle
        echo "cluster.sh: up; export SLURM_CONF=$SLURM_CONF"
        ;;
    stop)
        # Jobs first, so no step outlives the daemons that track it.
        scancel --full --quiet --user=root 2>/dev/null || true
        stop_pidfile "$state/slurmd.pid"
        stop_pidfile "$state/slurmctld.pid"
        stop_pidfile "$state/munged.pid"
        ;;
    status)
        sinfo
        squeue
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac

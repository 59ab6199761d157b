#!/usr/bin/env bash
# Start a self-contained 2-node SLURM test cluster on this one machine.
#
#   sudo tests/slurm_cluster/setup.sh [STATE_DIR]      (default /tmp/ftdist-slurm)
#   eval "$(sudo tests/slurm_cluster/setup.sh /tmp/ftdist-slurm | tail -1)"
#
# Env knobs: FTDIST_SLURM_WAIT_S (default 60: bound on each wait),
#            FTDIST_SLURM_CRED_EXPIRE (default 10: AuthInfo cred_expire, which is
#            also the requeue delay; slurm's default is 120, minimum 5).
#
# Idempotent: if the cluster in STATE_DIR is already up (both nodes idle) it
# only re-prints the environment; stale daemons from an earlier run of the
# same STATE_DIR are stopped first.  Everything (config, munge key and socket,
# state, spool, logs, pid files) lives under STATE_DIR, so it does not touch a
# system-wide munge/slurm install and several clusters cannot clash (free
# ports are picked at start).
#
# Must run as root (SlurmUser=root, slurmd must run as root).
# Exit codes: 0 ok, 2 usage/not root, 3 install failed, 4 daemon failed.
# On success the last line on stdout is:  export SLURM_CONF=STATE_DIR/slurm.conf
set -euo pipefail

STATE_DIR="${1:-/tmp/ftdist-slurm}"
WAIT_S="${FTDIST_SLURM_WAIT_S:-60}"
CRED_EXPIRE="${FTDIST_SLURM_CRED_EXPIRE:-10}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "[slurm-setup] $*" >&2; }
die() { local rc="$1"; shift; echo "[slurm-setup] ERROR: $*" >&2; exit "$rc"; }

[ "$(id -u)" -eq 0 ] || die 2 "must run as root (slurmd and SlurmUser=root need it)"

mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
CONF="$STATE_DIR/slurm.conf"

# ---------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
   || ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die 3 "slurmctld missing and apt-get not available"
    log "installing slurm-wlm and munge via apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >"$STATE_DIR/apt.log" 2>&1; then
        tail -20 "$STATE_DIR/apt.log" >&2
        die 3 "apt-get update failed (see $STATE_DIR/apt.log)"
    fi
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge \
            >>"$STATE_DIR/apt.log" 2>&1; then
        tail -20 "$STATE_DIR/apt.log" >&2
        die 3 "apt-get install slurm-wlm munge failed (see $STATE_DIR/apt.log)"
    fi
    command -v slurmctld >/dev/null 2>&1 || die 3 "slurmctld still missing after install"
fi
SLURM_VERSION="$(slurmd -V 2>/dev/null | awk '{print $2}')"
log "slurm version: ${SLURM_VERSION:-unknown}"

# ------------------------------------------------- already running? (idempotent)
export SLURM_CONF="$CONF"
nodes_idle() {
    # both node1 and node2 idle (or mixed/allocated: up and usable)
    local out
    out="$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    echo "$out" | grep -Eq '^node1 (idle|mix|alloc)$' &&
        echo "$out" | grep -Eq '^node2 (idle|mix|alloc)$'
}
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ -f "$CONF" ] && pid_alive "$STATE_DIR/run/slurmctld.pid" \
   && pid_alive "$STATE_DIR/run/slurmd-node1.pid" \
   && pid_alive "$STATE_DIR/run/slurmd-node2.pid" && nodes_idle; then
    log "cluster in $STATE_DIR already running"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
# stop anything left over from an earlier run of this state dir
bash "$HERE/teardown.sh" "$STATE_DIR" >/dev/null 2>&1 || true

# ---------------------------------------------------------------- layout
mkdir -p "$STATE_DIR"/{run,log,ctld,spool/node1,spool/node2,munge}
# world-readable so that a non-root user (tests run via sudo) reaches the munge
# socket and slurm.conf; the key itself is 0400 root
chmod 0755 "$STATE_DIR" "$STATE_DIR"/{run,log,ctld,spool,munge}
rm -f "$STATE_DIR"/log/*.log

HOST="$(hostname -s)"
NCPU="$(nproc)"
MEM_MB="$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)"
# both slurmd's report the whole machine; give each "node" half, at least 1 GB
NODE_MEM=$(( MEM_MB / 2 )); [ "$NODE_MEM" -ge 1024 ] || NODE_MEM=1024

# free TCP ports: slurmctld, node1, node2 (bound-and-released by the kernel)
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
if command -v python3 >/dev/null 2>&1; then
    read -r CTLD_PORT D1_PORT D2_PORT <<<"$(free_ports 3)"
else
    base=$(( 20000 + RANDOM % 20000 ))
    CTLD_PORT=$base; D1_PORT=$((base + 1)); D2_PORT=$((base + 2))
fi

# ---------------------------------------------------------------- munge
MUNGE_KEY="$STATE_DIR/munge/munge.key"
MUNGE_SOCK="$STATE_DIR/munge/munge.socket"
if [ ! -s "$MUNGE_KEY" ]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
fi
chmod 0400 "$MUNGE_KEY"

# ---------------------------------------------------------------- slurm.conf
cat >"$CONF" <<EOF
# generated by tests/slurm_cluster/setup.sh -- 2 slurmd on one host ($HOST)
ClusterName=ftdisttest
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (BeginTime = requeue time + cred_expire + 1; default 120 s, minimum 5)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE

StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# no cgroups anywhere
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

SchedulerType=sched/backfill
# re-test pending jobs every 2 s (default 60/30 s): a requeued job starts soon
# after its BeginTime instead of up to a minute later
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# both slurmd's see the same hardware: trust the config, never drain on mismatch
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# fast turnaround for tests
SlurmdTimeout=30
InactiveLimit=0
# SLURM's default: a job that is cancelled, requeued or out of time has 30 s between SIGTERM and
# SIGKILL to save a checkpoint; the stop-path tests rely on it (5 s was too tight on a loaded machine)
KillWait=30
MinJobAge=300
MessageTimeout=10

NodeName=node1 NodeHostname=$HOST NodeAddr=$HOST Port=$D1_PORT CPUs=$NCPU RealMemory=$NODE_MEM State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=$HOST Port=$D2_PORT CPUs=$NCPU RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# slurm >= 24.05 can be told to never touch cgroups (older versions reject
# "disabled" and load no cgroup plugin with the plugins chosen above)
rm -f "$STATE_DIR/cgroup.conf"
if [ "${SLURM_VERSION%%.*}" -ge 24 ] 2>/dev/null; then
    echo "CgroupPlugin=disabled" >"$STATE_DIR/cgroup.conf"
fi

# ---------------------------------------------------------------- start daemons
dump_logs() {
    for f in "$STATE_DIR"/log/*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (tail) -----" >&2
        tail -25 "$f" >&2
    done
}

log "starting munged (socket $MUNGE_SOCK)"
munged -f --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" \
    --pid-file="$STATE_DIR/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munged.seed" \
    || { dump_logs; die 4 "munged failed to start"; }
for _ in $(seq 50); do [ -S "$MUNGE_SOCK" ] && break; sleep 0.1; done
if ! munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then
    dump_logs; die 4 "munge credential round-trip failed"
fi

log "starting slurmctld (port $CTLD_PORT)"
slurmctld -f "$CONF" -c -i || { dump_logs; die 4 "slurmctld failed to start"; }
# wait for the controller to answer
ok=0
for _ in $(seq $(( WAIT_S * 2 ))); do
    if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
    sleep 0.5
done
[ "$ok" = 1 ] || { dump_logs; die 4 "slurmctld did not answer within ${WAIT_S}s"; }

for n in node1 node2; do
    log "starting slurmd -N $n"
    slurmd -f "$CONF" -N "$n" || { dump_logs; die 4 "slurmd -N $n failed to start"; }
done

deadline=$(( SECONDS + WAIT_S ))
until nodes_idle; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "sinfo:" >&2; timeout 10 sinfo -N -l >&2 || true
        dump_logs
        die 4 "nodes node1/node2 not idle within ${WAIT_S}s"
    fi
    sleep 0.5
done
timeout 10 sinfo -N >&2 || true
log "cluster up in $STATE_DIR (slurm ${SLURM_VERSION:-?}, ${NCPU} CPUs/node)"
echo "export SLURM_CONF=$CONF"

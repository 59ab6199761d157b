#!/usr/bin/env bash
# Stop the test cluster started by setup.sh:  teardown.sh [STATE_DIR]
# Stops slurmd (node1, node2), slurmctld and munged via their pid files in
# STATE_DIR/run. SIGTERM, bounded wait, then SIGKILL. Never hangs; always exits 0
# unless a daemon survives SIGKILL (exit 1). Leaves STATE_DIR (logs) in place.
set -u

STATE_DIR="${1:-/tmp/ftdist-slurm}"
RUN="$STATE_DIR/run"
TERM_WAIT_S="${FTDIST_SLURM_TERM_WAIT_S:-10}"

log() { echo "[slurm-teardown] $*" >&2; }

[ -d "$RUN" ] || { log "nothing to stop in $STATE_DIR"; exit 0; }

# cancel leftover jobs first so slurmstepd's exit cleanly (bounded)
if [ -f "$STATE_DIR/slurm.conf" ] && [ -s "$RUN/slurmctld.pid" ] \
   && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    jobs="$(SLURM_CONF="$STATE_DIR/slurm.conf" timeout 5 squeue -h -o %A 2>/dev/null)" || jobs=""
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        SLURM_CONF="$STATE_DIR/slurm.conf" timeout 5 scancel --quiet $jobs >/dev/null 2>&1 || true
        sleep 1
    fi
fi

# pid -> is it still our daemon? (guard against pid reuse)
is_ours() {
    local pid="$1" name="$2" comm
    local state
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    case "$comm" in "$name"*) ;; *) return 1 ;; esac
    # a zombie (exited, parent - maybe a non-reaping pid 1 - not yet reaped) is dead
    state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
    [ "$state" != Z ] && [ -n "$state" ]
}

stop() {  # stop PIDFILE NAME
    local pf="$1" name="$2" pid i
    [ -s "$pf" ] || return 0
    pid="$(cat "$pf" 2>/dev/null)"
    case "$pid" in ''|*[!0-9]*) rm -f "$pf"; return 0 ;; esac
    if ! is_ours "$pid" "$name"; then rm -f "$pf"; return 0; fi
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < TERM_WAIT_S * 10; i++)); do
        is_ours "$pid" "$name" || break
        sleep 0.1
    done
    if is_ours "$pid" "$name"; then
        log "$name ($pid) ignored SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        for ((i = 0; i < 30; i++)); do is_ours "$pid" "$name" || break; sleep 0.1; done
    fi
    if is_ours "$pid" "$name"; then
        log "$name ($pid) still alive"
        return 1
    fi
    rm -f "$pf"
    log "stopped $name ($pid)"
}

rc=0
stop "$RUN/slurmd-node1.pid" slurmd || rc=1
stop "$RUN/slurmd-node2.pid" slurmd || rc=1
stop "$RUN/slurmctld.pid" slurmctld || rc=1
stop "$RUN/munged.pid" munged || rc=1

# kill orphaned slurmstepd's of this cluster (slurmd passed them our SLURM_CONF)
# together with the job processes below them
descendants() {  # all descendant pids of $1
    local kids k
    kids="$(ps -eo pid=,ppid= 2>/dev/null | awk -v p="$1" '$2 == p {print $1}')"
    for k in $kids; do echo "$k"; descendants "$k"; done
}
for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$STATE_DIR/slurm.conf"; then
        victims="$pid $(descendants "$pid" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        kill -KILL $victims 2>/dev/null
        log "killed leftover slurmstepd $pid and its job processes ($victims)"
    fi
done
exit "$rc"

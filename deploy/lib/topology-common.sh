# Shared by netns-topology.sh and ha-topology.sh (sourced, not run): logging, processes
# tracked by PID in $STATE, and hosts linked to the bridge in the $NS_SW namespace.
# The sourcing script defines err(), do_down(), show_logs() and the variables used here.
# shellcheck shell=bash

log() { printf '%s\n' "$*"; }

die() {
    err "$*"
    exit 1
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# alive PID: the process exists and is not a zombie
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# ours PID: its command line mentions our state directory (guards against PID reuse)
ours() {
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$STATE/"* ]]
}

# start NAME NS CMD...: run CMD detached in namespace NS, output in $STATE/NAME.out
start() {
    local name=$1 ns=$2
    shift 2
    (cd "$STATE" && exec ip netns exec "$ns" setsid "$@" >"$STATE/$name.out" 2>&1 </dev/null) &
    echo "$!" >"$STATE/$name.pid"
}

# stop_pid PID LABEL: SIGTERM, wait up to 15 s, then SIGKILL
stop_pid() {
    local pid=$1 label=$2 i rc
    alive "$pid" || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        err "$label (PID $pid) did not stop after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    # When the process is our child (subcommand `all`), report how it ended.
    if wait "$pid" 2>/dev/null; then
        log "  stopped $label (PID $pid, exit 0)"
    else
        rc=$?
        if ((rc == 127)); then
            log "  stopped $label (PID $pid)"
        elif ((rc > 128)); then
            log "  stopped $label (PID $pid, ended by signal $((rc - 128)))"
        else
            log "  stopped $label (PID $pid, exit $rc)"
        fi
    fi
}

link_host() { # link_host NS IP SHORT: veth from the bridge to NS, address IP/24 on eth0
    local ns=$1 ip=$2 short=$3
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$NS_SW" link add "to-$short" type veth peer name eth0 netns "$ns"
    ip -n "$NS_SW" link set "to-$short" master br0 up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
}

# on_failed_up: after a failed `up`, show the logs and remove what was created
on_failed_up() {
    show_logs
    if [[ ${PIBL_NS_KEEP:-0} == 1 ]]; then
        err "up failed; kept everything for inspection (run '$0 down' to remove it)"
    else
        err "up failed; removing what was created"
        do_down >&2 || true
    fi
}

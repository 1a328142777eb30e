#!/usr/bin/env bash
# Two PIBL hosts sharing a virtual IP with keepalived (VRRP), in front of three app
# servers, all on ONE Linux machine built from network namespaces:
#
#   <prefix>client 10.213.0.100 --+
#   <prefix>lb1    10.213.0.21  --+          PIBL :8080 + keepalived MASTER (priority 150)
#   <prefix>lb2    10.213.0.22  --+          PIBL :8080 + keepalived BACKUP (priority 100)
#                  10.213.0.50    |  VIP, held by whichever of lb1/lb2 is master
#   <prefix>app1   10.213.0.11  --+-- br0    replica-1 on :8001
#   <prefix>app2   10.213.0.12  --+  (in     replica-2 on :8001
#   <prefix>app3   10.213.0.13  --+  <prefix>sw)  replica-3 on :8001
#
# Same conventions as netns-topology.sh: the links are created inside the namespaces, so
# the 10.213.0.0/24 network (VIP included) exists only in there and all traffic stays in
# there; processes are tracked by PID files in the state directory and stopped by PID.
# keepalived runs in each lb namespace with its own configuration, in the foreground
# (--dont-fork), VRRP only, with its PID files in the state directory. It tracks
# deploy/ha/check_pibl.sh (admin /health plus a request through the proxy, every second;
# run from a copy in the root-only state directory, as enable_script_security requires).
#
# Usage: deploy/ha-topology.sh up|check|down|all|status|deps
#   up      create the namespaces, start the replicas, PIBL on lb1 and lb2, then keepalived
#           (lb1 first; it must take the VIP before lb2 starts)
#   check   from the client namespace, GET http://VIP:8080/api/info 10 times a second (at
#           most 30 s); after about 3 s kill -9 PIBL and keepalived on the host holding the
#           VIP (all frozen with SIGSTOP first, so none can react: a host failure),
#           measure how long until requests succeed again and count
#           the failed ones. Prints "failover: service resumed after X.XX s, N failed
#           requests of M"; exit 1 unless service resumed within PIBL_HA_MAX_RESUME
#           seconds. It breaks the active host on purpose: run `down` and `up` to repeat.
#   down    stop the processes (by the PIDs in the state directory), delete the
#           namespaces and the state directory; safe after a partial `up`
#   all     deps, up, check, down (down also runs on any exit); exit status is the check's
#   status  show what exists and which host holds the VIP
#   deps    install keepalived with apt-get if it is missing (exit 3 if impossible)
#
# Environment:
#   PIBL_NS_PREFIX      namespace name prefix (default "piblha-"); use a unique one per run
#   PIBL_VENV           virtualenv with pibl and its [app] extra (default <repo>/.venv)
#   PIBL_NS_STATE       state directory (default ${TMPDIR:-/tmp}/<prefix>ha-topology)
#   PIBL_NS_KEEP=1      keep the state directory (logs, configs) after `down`
#   PIBL_HA_MAX_RESUME  seconds within which service must resume (default 5)
#   PIBL_HA_INSTALL=0   never install keepalived (exit 3 when it is missing)
#
# Needs root, iproute2, curl and keepalived. Exit status: 0 ok, 1 failure, 2 usage,
# 3 keepalived missing and not installable.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
PREFIX=${PIBL_NS_PREFIX:-piblha-}
VENV=${PIBL_VENV:-$REPO/.venv}
STATE=${PIBL_NS_STATE:-${TMPDIR:-/tmp}/${PREFIX}ha-topology}
PY=$VENV/bin/python
CHECK_SCRIPT=$REPO/deploy/ha/check_pibl.sh
MAX_RESUME=${PIBL_HA_MAX_RESUME:-5}

SUBNET=10.213.0
VIP=$SUBNET.50
CLIENT_IP=$SUBNET.100
LBS=(lb1 lb2)
declare -A LB_IP=([lb1]=$SUBNET.21 [lb2]=$SUBNET.22)
declare -A LB_STATE=([lb1]=MASTER [lb2]=BACKUP)
declare -A LB_PRIORITY=([lb1]=150 [lb2]=100)
APP_IPS=("$SUBNET.11" "$SUBNET.12" "$SUBNET.13")
APP_PORT=8001
LB_PORT=8080
ADMIN_PORT=9090
# Same on both keepalived instances, and different for every prefix (1-255).
VRID=$(($(printf '%s' "$PREFIX" | cksum | cut -d' ' -f1) % 255 + 1))

NS_SW=${PREFIX}sw
NS_CLIENT=${PREFIX}client
NS_APPS=("${PREFIX}app1" "${PREFIX}app2" "${PREFIX}app3")
ALL_NS=("$NS_CLIENT" "${PREFIX}lb1" "${PREFIX}lb2" "${NS_APPS[@]}" "$NS_SW")

err() { printf 'ha-topology: %s\n' "$*" >&2; }
# shellcheck source=deploy/lib/topology-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/topology-common.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

preflight() {
    [[ $PREFIX =~ ^[A-Za-z0-9_.-]{1,40}$ ]] ||
        die "PIBL_NS_PREFIX must be 1-40 characters of A-Z a-z 0-9 _ . - (got '$PREFIX')"
    [[ $MAX_RESUME =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "PIBL_HA_MAX_RESUME must be a number of seconds"
    ((EUID == 0)) || die "must run as root (network namespaces need CAP_SYS_ADMIN)"
    command -v ip >/dev/null || die "'ip' (iproute2) not found"
}

ns_of() { printf '%s%s' "$PREFIX" "$1"; }

# -- keepalived -----------------------------------------------------------------------

# ensure_keepalived: install Debian's keepalived if missing; exit 3 when it is unusable.
# (Installing it starts no daemon on the host: the packaged service needs
# /etc/keepalived/keepalived.conf, which this script never creates.)
ensure_keepalived() {
    if ! command -v keepalived >/dev/null; then
        [[ ${PIBL_HA_INSTALL:-1} != 0 ]] || {
            err "keepalived is not installed (and PIBL_HA_INSTALL=0)"
            exit 3
        }
        command -v apt-get >/dev/null || {
            err "keepalived is not installed and apt-get is not available"
            exit 3
        }
        log "== deps: installing keepalived with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y --no-install-recommends keepalived >"${TMPDIR:-/tmp}/${PREFIX}apt.log" 2>&1; then
            apt-get update >>"${TMPDIR:-/tmp}/${PREFIX}apt.log" 2>&1 || true
            apt-get install -y --no-install-recommends keepalived >>"${TMPDIR:-/tmp}/${PREFIX}apt.log" 2>&1 || {
                err "could not install keepalived with apt-get:"
                tail -n 5 "${TMPDIR:-/tmp}/${PREFIX}apt.log" >&2
                rm -f "${TMPDIR:-/tmp}/${PREFIX}apt.log"
                exit 3
            }
        fi
        rm -f "${TMPDIR:-/tmp}/${PREFIX}apt.log"
    fi
    keepalived --version >/dev/null 2>&1 || {
        err "keepalived is installed but does not run ('keepalived --version' failed)"
        exit 3
    }
}

# pid_from FILE: the PID in FILE if it is a live process of ours, else nothing
pid_from() {
    local pid
    [[ -f $1 ]] || return 0
    pid=$(<"$1")
    pid=${pid//[[:space:]]/}
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid"; then
        printf '%s' "$pid"
    fi
}

# -- HTTP -----------------------------------------------------------------------------

# status_in NS URL: HTTP status of GET URL from inside NS (000: no answer)
status_in() {
    ip netns exec "$1" curl -s --noproxy '*' --max-time 2 -o /dev/null -w '%{http_code}' "$2" \
        2>/dev/null || true
}

# wait_http NS URL SECONDS PID: until URL answers 200 (fails early if PID died)
wait_http() {
    local ns=$1 url=$2 seconds=$3 pid=$4 i
    for ((i = 0; i < seconds * 5; i++)); do
        alive "$pid" || return 1
        [[ $(status_in "$ns" "$url") == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

# vip_holders: the lb hosts that have the VIP on an interface
vip_holders() {
    local lb out=()
    for lb in "${LBS[@]}"; do
        ns_exists "$(ns_of "$lb")" || continue
        if ip -n "$(ns_of "$lb")" -4 -o addr show 2>/dev/null | grep -q " inet $VIP/"; then
            out+=("$lb")
        fi
    done
    printf '%s\n' "${out[*]}"
}

# -- up -------------------------------------------------------------------------------

show_logs() {
    local f
    for f in "$STATE"/*.out "$STATE"/pibl-*.log; do
        [[ -s $f ]] || continue
        err "---- ${f##*/} (last 20 lines) ----"
        tail -n 20 "$f" >&2
    done
}

write_pibl_config() { # write_pibl_config LB
    local lb=$1 i
    {
        echo "# Generated by ha-topology.sh: PIBL on $lb, one of two hosts sharing $VIP."
        echo "[server]"
        echo "host = \"0.0.0.0\"      # the VIP comes and goes; listen on every address"
        echo "port = $LB_PORT"
        echo "via = \"pibl-$lb\"      # shows in the Via header which host served"
        echo "workers = 2"
        echo
        echo "[timeouts]"
        echo "upstream_connect = 1.0"
        echo "shutdown = 5.0"
        echo
        echo "[cache]"
        echo "enabled = false"
        echo
        echo "[health]"
        echo "path = \"/health\""
        echo "interval = 1"
        echo
        echo "[admin]"
        echo "host = \"${LB_IP[$lb]}\""
        echo "port = $ADMIN_PORT"
        echo
        echo "[log]"
        echo "file = \"$STATE/pibl-$lb.log\""
        echo "stdout = false"
        for i in 0 1 2; do
            echo
            echo "[[backends]]"
            echo "name = \"replica-$((i + 1))\""
            echo "url = \"http://${APP_IPS[i]}:$APP_PORT\""
        done
    } >"$STATE/pibl-$lb.toml"
}

write_keepalived_config() { # write_keepalived_config LB AUTH_PASS
    local lb=$1 auth=$2 ip=${LB_IP[$1]}
    cat >"$STATE/ka-$lb.conf" <<EOF
# Generated by ha-topology.sh for $lb (see deploy/ha/keepalived.conf.example).
global_defs {
    router_id ${PREFIX}$lb
    # The check runs as root from a copy in the root-only state directory: with
    # enable_script_security keepalived refuses a script any other user could modify.
    script_user root
    enable_script_security
    vrrp_garp_master_delay 5
    vrrp_garp_master_repeat 3
}

vrrp_script chk_pibl {
    script "$STATE/check_pibl.sh http://$ip:$ADMIN_PORT/health http://$ip:$LB_PORT/health"
    interval 1
    timeout 3
    fall 2
    rise 2
    weight -60
}

vrrp_instance PIBL_VIP {
    state ${LB_STATE[$lb]}
    interface eth0
    virtual_router_id $VRID
    priority ${LB_PRIORITY[$lb]}
    advert_int 1
    authentication {
        auth_type PASS
        auth_pass $auth
    }
    virtual_ipaddress {
        $VIP/24 dev eth0
    }
    track_script {
        chk_pibl
    }
}
EOF
}

# Checks made before anything is created: a refusal here must not tear down a running
# topology that uses the same prefix.
up_precheck() {
    local ns
    [[ -x $PY ]] || die "no Python at $PY (set PIBL_VENV to a virtualenv with pibl[app])"
    "$PY" -c 'import pibl, webapp, uvicorn' 2>/dev/null ||
        die "$PY cannot import pibl, webapp and uvicorn (pip install 'pibl[app]')"
    command -v curl >/dev/null || die "curl not found (deploy/ha/check_pibl.sh needs it)"
    [[ -x $CHECK_SCRIPT ]] || die "$CHECK_SCRIPT is missing or not executable"
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && die "namespace $ns already exists; run '$0 down' first (or choose another PIBL_NS_PREFIX)"
    done
    if compgen -G "$STATE/*.pid" >/dev/null; then
        die "$STATE holds PID files of an earlier run; run '$0 down' first"
    fi
}

# wait_log FILE PATTERN SECONDS PID: until FILE contains PATTERN (fails early if PID died)
wait_log() {
    local file=$1 pattern=$2 seconds=$3 pid=$4 i
    for ((i = 0; i < seconds * 10; i++)); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        alive "$pid" || return 1
        sleep 0.1
    done
    return 1
}

start_keepalived() { # start_keepalived LB
    local lb=$1
    start "ka-$lb" "$(ns_of "$lb")" keepalived --vrrp --dont-fork --log-console --log-detail \
        --no-syslog --use-file "$STATE/ka-$lb.conf" --pid "$STATE/ka-$lb.main.pid" \
        --vrrp_pid "$STATE/ka-$lb.vrrp.pid" --checkers_pid "$STATE/ka-$lb.checkers.pid"
}

do_up() {
    local i pid lb auth code
    mkdir -p "$STATE"
    chmod 700 "$STATE"

    log "== up: namespaces ${PREFIX}{sw,lb1,lb2,app1,app2,app3,client}, state in $STATE"
    ip netns add "$NS_SW"
    ip -n "$NS_SW" link set lo up
    ip -n "$NS_SW" link add br0 type bridge
    ip -n "$NS_SW" link set br0 up
    for lb in "${LBS[@]}"; do
        link_host "$(ns_of "$lb")" "${LB_IP[$lb]}" "$lb"
    done
    link_host "$NS_CLIENT" "$CLIENT_IP" client
    for i in 0 1 2; do
        link_host "${NS_APPS[i]}" "${APP_IPS[i]}" "app$((i + 1))"
    done

    for i in 0 1 2; do
        start "app$((i + 1))" "${NS_APPS[i]}" "$PY" -m webapp --name "replica-$((i + 1))" \
            --host "${APP_IPS[i]}" --port "$APP_PORT" --db "$STATE/gb.sqlite3"
    done
    for i in 0 1 2; do
        pid=$(<"$STATE/app$((i + 1)).pid")
        wait_http "$(ns_of lb1)" "http://${APP_IPS[i]}:$APP_PORT/health" 30 "$pid" ||
            die "replica-$((i + 1)) (PID $pid) did not become healthy"
        log "  replica-$((i + 1)) up in ${NS_APPS[i]} at http://${APP_IPS[i]}:$APP_PORT (PID $pid)"
    done

    for lb in "${LBS[@]}"; do
        write_pibl_config "$lb"
        "$VENV/bin/pibl" check-config "$STATE/pibl-$lb.toml" >/dev/null
        start "pibl-$lb" "$(ns_of "$lb")" "$VENV/bin/pibl" run --config "$STATE/pibl-$lb.toml"
    done
    for lb in "${LBS[@]}"; do
        pid=$(<"$STATE/pibl-$lb.pid")
        wait_http "$(ns_of "$lb")" "http://${LB_IP[$lb]}:$ADMIN_PORT/health" 20 "$pid" ||
            die "pibl on $lb (PID $pid) did not answer on its admin listener"
        code=0
        ip netns exec "$(ns_of "$lb")" "$CHECK_SCRIPT" "http://${LB_IP[$lb]}:$ADMIN_PORT/health" \
            "http://${LB_IP[$lb]}:$LB_PORT/health" 2>/dev/null || code=$?
        ((code == 0)) || die "deploy/ha/check_pibl.sh fails on $lb (exit $code)"
        log "  pibl up in $(ns_of "$lb") on :$LB_PORT, admin http://${LB_IP[$lb]}:$ADMIN_PORT (PID $pid); check_pibl.sh: ok"
    done

    install -m 0755 "$CHECK_SCRIPT" "$STATE/check_pibl.sh"
    auth=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
    for lb in "${LBS[@]}"; do
        write_keepalived_config "$lb" "$auth"
        keepalived --config-test -f "$STATE/ka-$lb.conf" >"$STATE/ka-$lb.test" 2>&1 || {
            cat "$STATE/ka-$lb.test" >&2
            die "keepalived rejects $STATE/ka-$lb.conf"
        }
    done
    # lb1 first: it must be master (VIP on its eth0, chk_pibl passing) before lb2 starts,
    # so that the failure in `check` always hits lb1.
    start_keepalived lb1
    pid=$(<"$STATE/ka-lb1.pid")
    wait_log "$STATE/ka-lb1.out" "VRRP_Script(chk_pibl) succeeded" 15 "$pid" ||
        die "keepalived on lb1 (PID $pid): chk_pibl did not succeed within 15 s"
    for ((i = 0; i < 100; i++)); do
        [[ $(vip_holders) == lb1 ]] && break
        alive "$pid" || die "keepalived on lb1 (PID $pid) exited"
        sleep 0.1
    done
    [[ $(vip_holders) == lb1 ]] || die "lb1 did not take the VIP $VIP within 10 s"
    log "  keepalived on lb1: MASTER, holds $VIP (PID $pid, VRID $VRID)"

    start_keepalived lb2
    pid=$(<"$STATE/ka-lb2.pid")
    wait_log "$STATE/ka-lb2.out" "Entering BACKUP STATE" 15 "$pid" ||
        die "keepalived on lb2 (PID $pid) did not enter BACKUP state"
    wait_log "$STATE/ka-lb2.out" "VRRP_Script(chk_pibl) succeeded" 15 "$pid" ||
        die "keepalived on lb2 (PID $pid): chk_pibl did not succeed within 15 s"
    [[ $(vip_holders) == lb1 ]] || die "the VIP is not (only) on lb1 after lb2 started: $(vip_holders)"
    log "  keepalived on lb2: BACKUP (PID $pid)"
    log "  client namespace: $NS_CLIENT ($CLIENT_IP); try:"
    log "    ip netns exec $NS_CLIENT curl -si http://$VIP:$LB_PORT/api/info"
}

# -- check ----------------------------------------------------------------------------

# The client: a bounded loop (10 requests/s, at most 30 s), one new connection per request,
# run inside the client namespace. It watches for the file recording the moment of the
# failure, stops once requests have succeeded again for 2 s, and prints the summary.
write_client() {
    cat >"$STATE/client_loop.py" <<'EOF'
import collections
import http.client
import json
import os
import sys
import time

host, port, path, kill_file, log_file = sys.argv[1:6]
limit = float(sys.argv[6])
RATE, CAP, SETTLE, TIMEOUT = 10.0, 30.0, 2.0, 1.0

def request():
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        via = (resp.getheader("Via") or "-").split()[-1]
        if resp.status != 200:
            return False, via, f"HTTP {resp.status}"
        return True, via, json.loads(body)["replica"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return False, "-", type(exc).__name__
    finally:
        conn.close()

records = []  # (start, end, ok, via, detail)
killed_at = None
resumed_at = None  # end of the first success after the failure with no failure since
t0 = time.time()
next_at = t0
with open(log_file, "a", buffering=1) as log:
    while time.time() - t0 < CAP:
        if killed_at is None and os.path.exists(kill_file):
            with open(kill_file) as fh:
                killed_at = float(fh.read().strip())
        start = time.time()
        ok, via, detail = request()
        end = time.time()
        records.append((start, end, ok, via, detail))
        log.write(f"{start:.3f} {end:.3f} {'OK' if ok else 'FAIL'} {via} {detail}\n")
        if not ok:
            resumed_at = None
        elif killed_at is not None and resumed_at is None and start >= killed_at:
            resumed_at = end
        if resumed_at is not None and end - resumed_at >= SETTLE:
            break
        next_at += 1.0 / RATE
        delay = next_at - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.time()

total = len(records)
failed = [r for r in records if not r[2]]
if killed_at is None:
    print(f"failover: the failure was never triggered, {len(failed)} failed requests of {total}")
    sys.exit(1)
before = collections.Counter(r[3] for r in records if r[1] < killed_at and r[2])
after = collections.Counter(r[3] for r in records if r[0] >= killed_at and r[2])
kinds = collections.Counter(r[4] for r in failed)
print(f"  before the failure: {sum(before.values())} ok, served by {dict(before)}")
print(f"  failed requests   : {dict(kinds) or 'none'}")
if failed:
    print(f"  failures from {failed[0][0] - killed_at:+.2f} s to {failed[-1][1] - killed_at:+.2f} s after the kill")
print(f"  after the failure : {sum(after.values())} ok, served by {dict(after)}")
if resumed_at is None:
    print(f"failover: service did not resume within {CAP:.0f} s, {len(failed)} failed requests of {total}")
    sys.exit(1)
resume = max(0.0, resumed_at - killed_at)
print(f"failover: service resumed after {resume:.2f} s, {len(failed)} failed requests of {total}")
sys.exit(0 if resume < limit else 1)
EOF
}

# host_pids LB: PIDs of keepalived (VRRP child, then parent) and PIBL (master, workers)
host_pids() {
    local lb=$1 pid child f pids=()
    for f in "$STATE/ka-$lb.vrrp.pid" "$STATE/ka-$lb.pid"; do
        pid=$(pid_from "$f")
        [[ -n $pid ]] && pids+=("$pid")
    done
    pid=$(pid_from "$STATE/pibl-$lb.pid")
    if [[ -n $pid ]]; then
        pids+=("$pid")
        # shellcheck disable=SC2013 # the file holds space-separated PIDs
        for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
            alive "$child" && ours "$child" && pids+=("$child")
        done
    fi
    printf '%s\n' "${pids[*]}"
}

# fail_host PIDS...: a host failure as seen from the network: freeze every process first
# (SIGSTOP), then kill -9 them all. Killing one by one would let a survivor react: the
# keepalived VRRP child, told by the kernel that its parent died, would still send a
# "priority 0" advertisement (a graceful hand-over) before its own SIGKILL arrived.
fail_host() {
    local pid
    kill -STOP "$@"
    kill -KILL "$@"
    for pid in "$@"; do
        { wait "$pid"; } 2>/dev/null || true # reap our children quietly (subcommand `all`)
    done
}

do_check() {
    local ns lb active standby pids i ok rc=0 loop_pid resume line
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" || die "namespace $ns does not exist; run '$0 up' first"
    done
    for lb in "${LBS[@]}"; do
        [[ -n $(pid_from "$STATE/ka-$lb.pid") && -n $(pid_from "$STATE/pibl-$lb.pid") ]] ||
            die "$lb is not running both PIBL and keepalived (an earlier check fails a host on purpose); run '$0 down' and '$0 up' first"
    done
    active=$(vip_holders)
    [[ $active == lb1 || $active == lb2 ]] ||
        die "the VIP $VIP must be on exactly one lb host (now on: '${active:-none}')"
    [[ $active == lb1 ]] && standby=lb2 || standby=lb1
    log "== check: from $NS_CLIENT ($CLIENT_IP) to http://$VIP:$LB_PORT/api/info; $active holds the VIP"
    for lb in "${LBS[@]}"; do
        rc=0
        ip netns exec "$(ns_of "$lb")" "$CHECK_SCRIPT" "http://${LB_IP[$lb]}:$ADMIN_PORT/health" \
            "http://${LB_IP[$lb]}:$LB_PORT/health" 2>/dev/null || rc=$?
        log "  check_pibl.sh on $lb: exit $rc"
        ((rc == 0)) || die "check_pibl.sh fails on $lb before the test"
    done

    write_client
    rm -f "$STATE/killed_at" "$STATE/client.log"
    ip netns exec "$NS_CLIENT" "$PY" "$STATE/client_loop.py" "$VIP" "$LB_PORT" /api/info \
        "$STATE/killed_at" "$STATE/client.log" "$MAX_RESUME" >"$STATE/client.out" 2>&1 &
    loop_pid=$!
    echo "$loop_pid" >"$STATE/client.pid"

    # About 3 s of successful requests through the VIP first.
    for ((i = 0; i < 100; i++)); do
        ok=$(grep -c ' OK ' "$STATE/client.log" 2>/dev/null || true)
        ((${ok:-0} >= 30)) && break
        alive "$loop_pid" || break
        sleep 0.1
    done
    if ((${ok:-0} < 30)); then
        kill -TERM "$loop_pid" 2>/dev/null || true
        wait "$loop_pid" 2>/dev/null || true
        tail -n 5 "$STATE/client.log" >&2 2>/dev/null || true
        die "fewer than 30 successful requests through the VIP in 10 s; not starting the failover test"
    fi

    pids=$(host_pids "$active")
    [[ -n $pids ]] || die "no processes of ours found on $active"
    printf '%s\n' "${EPOCHREALTIME:-$(date +%s.%N)}" >"$STATE/killed_at"
    # shellcheck disable=SC2086 # one PID per word
    fail_host $pids
    log "  $(date +%T.%3N) host failure: kill -9 of keepalived and PIBL on $active (PIDs $pids)"

    rc=0
    wait "$loop_pid" || rc=$?
    rm -f "$STATE/client.pid"
    cat "$STATE/client.out"
    resume=$(sed -n 's/^failover: service resumed after \([0-9.]*\) s.*/\1/p' "$STATE/client.out")

    log "== after the failure"
    line=$(grep -h "Entering MASTER STATE" "$STATE/ka-$standby.out" | tail -n 1 || true)
    log "  keepalived on $standby: ${line:-no MASTER transition logged}"
    log "  VIP $VIP now on: $(vip_holders) (the killed host keeps the address configured: its kernel still runs)"
    if ! ip -n "$(ns_of "$standby")" -4 -o addr show 2>/dev/null | grep -q " inet $VIP/"; then
        log "  result: FAIL ($standby did not take the VIP)"
        return 1
    fi
    if ((rc != 0)) || [[ -z $resume ]]; then
        log "  result: FAIL (service must resume within $MAX_RESUME s)"
        return 1
    fi
    log "  result: PASS (resumed after $resume s, limit $MAX_RESUME s)"
}

# -- down -----------------------------------------------------------------------------

do_down() {
    local name pidfile pid ns leftovers
    log "== down: ${PREFIX}* namespaces, state in $STATE"
    # keepalived first (it removes the VIP), then PIBL (it drains), then the replicas.
    for name in client ka-lb2 ka-lb1 pibl-lb1 pibl-lb2 app1 app2 app3; do
        pidfile=$STATE/$name.pid
        [[ -f $pidfile ]] || continue
        pid=$(pid_from "$pidfile")
        [[ -n $pid ]] && stop_pid "$pid" "$name"
        rm -f "$pidfile"
    done
    # Anything still running inside our namespaces was started by us: stop it by PID.
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" || continue
        leftovers=$(ip netns pids "$ns" 2>/dev/null || true)
        for pid in $leftovers; do
            stop_pid "$pid" "process in $ns"
        done
    done
    for ns in "${ALL_NS[@]}"; do
        if ns_exists "$ns"; then
            ip netns del "$ns" 2>/dev/null || err "could not delete namespace $ns"
        fi
    done
    if [[ ${PIBL_NS_KEEP:-0} == 1 ]]; then
        log "  kept $STATE"
    elif [[ -d $STATE ]]; then
        rm -rf -- "$STATE"
    fi
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && {
            err "namespace $ns still exists"
            return 1
        }
    done
    log "  removed"
}

do_status() {
    local ns name pid
    for ns in "${ALL_NS[@]}"; do
        if ns_exists "$ns"; then log "namespace $ns: present"; else log "namespace $ns: absent"; fi
    done
    for name in ka-lb1 ka-lb2 pibl-lb1 pibl-lb2 app1 app2 app3; do
        [[ -f $STATE/$name.pid ]] || continue
        pid=$(pid_from "$STATE/$name.pid")
        if [[ -n $pid ]]; then log "$name: running (PID $pid)"; else log "$name: not running"; fi
    done
    log "VIP $VIP on: $(vip_holders)"
}

# -- main -----------------------------------------------------------------------------

main() {
    local cmd=${1:-}
    case $cmd in
    deps)
        preflight
        ensure_keepalived
        log "keepalived: $(keepalived --version 2>&1 | head -n 1)"
        ;;
    up)
        preflight
        ensure_keepalived
        up_precheck
        trap 'rc=$?; trap - EXIT; ((rc == 0)) || on_failed_up; exit "$rc"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        do_up
        trap - EXIT INT TERM
        ;;
    check)
        preflight
        do_check
        ;;
    down)
        preflight
        do_down
        ;;
    status)
        preflight
        do_status
        ;;
    all)
        preflight
        ensure_keepalived
        up_precheck
        # Whatever happens from here on (failure, Ctrl-C, SIGTERM), tear everything down.
        trap 'rc=$?; trap - EXIT; ((rc == 0 || rc > 128)) || show_logs; do_down || rc=1; exit "$rc"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        do_up
        do_check
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"

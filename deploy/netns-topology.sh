#!/usr/bin/env bash
# PIBL's four-host deployment (one proxy, three app servers) on ONE Linux machine,
# built from network namespaces:
#
#   <prefix>client 10.213.0.100 --+
#   <prefix>lb     10.213.0.10  --+          PIBL on :8080
#   <prefix>app1   10.213.0.11  --+-- br0    replica-1 on :8001
#   <prefix>app2   10.213.0.12  --+  (in     replica-2 on :8001
#   <prefix>app3   10.213.0.13  --+  <prefix>sw)  replica-3 on :8001
#
# Every namespace is joined to a bridge inside <prefix>sw by a veth pair; the links are
# created directly inside the namespaces, so nothing is added to the host's own network
# and the 10.213.0.0/24 subnet exists only in there. The replicas share one SQLite file in
# the state directory (fine here: it is one machine and one local filesystem).
#
# Usage: deploy/netns-topology.sh up|check|down|all|status
#   up      create the namespaces, start the three replicas and PIBL
#   check   6 requests through PIBL (expect strict round robin), a guestbook entry posted
#           through PIBL and read back from every replica directly; exit 1 on failure
#   down    stop the processes (by the PIDs recorded in the state directory), delete the
#           namespaces and the state directory; safe after a partial `up`
#   all     up, check, down (down also runs on any exit); exit status is the check's
#   status  show what exists
#
# Environment:
#   PIBL_NS_PREFIX  namespace name prefix (default "pibl-"); use a unique one per run
#   PIBL_VENV       virtualenv with pibl and its [app] extra (default <repo>/.venv)
#   PIBL_NS_STATE   state directory (default ${TMPDIR:-/tmp}/<prefix>topology)
#   PIBL_NS_KEEP=1  keep the state directory (logs, config) after `down`
#
# Needs root and iproute2; uses curl when available, otherwise the venv's Python.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
PREFIX=${PIBL_NS_PREFIX:-pibl-}
VENV=${PIBL_VENV:-$REPO/.venv}
STATE=${PIBL_NS_STATE:-${TMPDIR:-/tmp}/${PREFIX}topology}
PY=$VENV/bin/python

SUBNET=10.213.0
LB_IP=$SUBNET.10
CLIENT_IP=$SUBNET.100
APP_IPS=("$SUBNET.11" "$SUBNET.12" "$SUBNET.13")
APP_PORT=8001
LB_PORT=8080
REQUESTS=6

NS_SW=${PREFIX}sw
NS_LB=${PREFIX}lb
NS_CLIENT=${PREFIX}client
NS_APPS=("${PREFIX}app1" "${PREFIX}app2" "${PREFIX}app3")
ALL_NS=("$NS_CLIENT" "$NS_LB" "${NS_APPS[@]}" "$NS_SW")

err() { printf 'netns-topology: %s\n' "$*" >&2; }
# shellcheck source=deploy/lib/topology-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/topology-common.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

preflight() {
    [[ $PREFIX =~ ^[A-Za-z0-9_.-]{1,40}$ ]] ||
        die "PIBL_NS_PREFIX must be 1-40 characters of A-Z a-z 0-9 _ . - (got '$PREFIX')"
    ((EUID == 0)) || die "must run as root (network namespaces need CAP_SYS_ADMIN)"
    command -v ip >/dev/null || die "'ip' (iproute2) not found"
}

# -- HTTP -----------------------------------------------------------------------------

HTTP_STATUS="" HTTP_REPLICA="" HTTP_BODY=""

# http NS METHOD URL [JSON]: one request from inside namespace NS; sets HTTP_STATUS,
# HTTP_REPLICA (the X-Replica response header) and HTTP_BODY. Never uses a proxy.
http() {
    local ns=$1 method=$2 url=$3 data=${4:-} out
    if command -v curl >/dev/null; then
        local hdr=$STATE/.http.head body=$STATE/.http.body
        local args=(-sS --noproxy '*' --max-time 10 -X "$method" -D "$hdr" -o "$body" -w '%{http_code}')
        [[ -n $data ]] && args+=(-H 'Content-Type: application/json' --data-binary "$data")
        HTTP_STATUS=$(ip netns exec "$ns" curl "${args[@]}" "$url" 2>/dev/null) || HTTP_STATUS=000
        HTTP_REPLICA=$(sed -n 's/^[Xx]-[Rr]eplica:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$hdr" 2>/dev/null | tail -n 1)
        HTTP_BODY=$(cat "$body" 2>/dev/null || true)
        rm -f "$hdr" "$body"
    else
        out=$(ip netns exec "$ns" "$PY" - "$method" "$url" "$data" <<'EOF'
import sys
import urllib.error
import urllib.request

method, url, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()
headers = {"Content-Type": "application/json"} if data else {}
req = urllib.request.Request(url, data=data or None, method=method, headers=headers)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    resp = opener.open(req, timeout=10)
except urllib.error.HTTPError as exc:
    resp = exc
except OSError:
    print("000\n-")
    sys.exit(0)
body = resp.read().decode("utf-8", "replace")
print(f"{resp.status}\n{resp.headers.get('X-Replica', '-')}\n{body}", end="")
EOF
        ) || out=$'000\n-'
        HTTP_STATUS=${out%%$'\n'*}
        out=${out#*$'\n'}
        HTTP_REPLICA=${out%%$'\n'*}
        [[ $out == *$'\n'* ]] && HTTP_BODY=${out#*$'\n'} || HTTP_BODY=""
    fi
}

json_replica() { sed -n 's/.*"replica":[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$1" | head -n 1; }

# wait_http NS URL SECONDS PID: until URL answers 200 (fails early if PID died)
wait_http() {
    local ns=$1 url=$2 seconds=$3 pid=$4 i
    for ((i = 0; i < seconds * 5; i++)); do
        alive "$pid" || return 1
        http "$ns" GET "$url"
        [[ $HTTP_STATUS == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

# -- up -------------------------------------------------------------------------------

show_logs() {
    local f
    for f in "$STATE"/*.out "$STATE"/pibl.log; do
        [[ -s $f ]] || continue
        err "---- ${f##*/} (last 20 lines) ----"
        tail -n 20 "$f" >&2
    done
}

write_config() {
    local i
    {
        echo "# Generated by netns-topology.sh: PIBL in $NS_LB in front of three replicas."
        echo "[server]"
        echo "host = \"$LB_IP\""
        echo "port = $LB_PORT"
        echo
        echo "[timeouts]"
        echo "shutdown = 5.0"
        echo
        echo "[log]"
        echo "file = \"$STATE/pibl.log\""
        echo "stdout = false"
        for i in 0 1 2; do
            echo
            echo "[[backends]]"
            echo "name = \"replica-$((i + 1))\""
            echo "url = \"http://${APP_IPS[i]}:$APP_PORT\""
        done
    } >"$STATE/pibl.toml"
}

# Checks made before anything is created: a refusal here must not tear down a running
# topology that uses the same prefix.
up_precheck() {
    local ns
    [[ -x $PY ]] || die "no Python at $PY (set PIBL_VENV to a virtualenv with pibl[app])"
    "$PY" -c 'import pibl, webapp, uvicorn' 2>/dev/null ||
        die "$PY cannot import pibl, webapp and uvicorn (pip install 'pibl[app]')"
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && die "namespace $ns already exists; run '$0 down' first (or choose another PIBL_NS_PREFIX)"
    done
    if [[ -e $STATE/pibl.pid || -e $STATE/app1.pid ]]; then
        die "$STATE holds PID files of an earlier run; run '$0 down' first"
    fi
}

do_up() {
    local i pid
    mkdir -p "$STATE"
    chmod 700 "$STATE"

    log "== up: namespaces ${PREFIX}{sw,lb,app1,app2,app3,client}, state in $STATE"
    ip netns add "$NS_SW"
    ip -n "$NS_SW" link set lo up
    ip -n "$NS_SW" link add br0 type bridge
    ip -n "$NS_SW" link set br0 up
    link_host "$NS_LB" "$LB_IP" lb
    link_host "$NS_CLIENT" "$CLIENT_IP" client
    for i in 0 1 2; do
        link_host "${NS_APPS[i]}" "${APP_IPS[i]}" "app$((i + 1))"
    done

    write_config
    "$VENV/bin/pibl" check-config "$STATE/pibl.toml" >/dev/null

    for i in 0 1 2; do
        start "app$((i + 1))" "${NS_APPS[i]}" "$PY" -m webapp --name "replica-$((i + 1))" \
            --host "${APP_IPS[i]}" --port "$APP_PORT" --db "$STATE/gb.sqlite3"
    done
    for i in 0 1 2; do
        pid=$(<"$STATE/app$((i + 1)).pid")
        # Health is checked from the proxy's host, the only one allowed to reach the apps.
        wait_http "$NS_LB" "http://${APP_IPS[i]}:$APP_PORT/health" 30 "$pid" ||
            die "replica-$((i + 1)) (PID $pid) did not become healthy"
        log "  replica-$((i + 1)) up in ${NS_APPS[i]} at http://${APP_IPS[i]}:$APP_PORT (PID $pid)"
    done

    start pibl "$NS_LB" "$VENV/bin/pibl" run --config "$STATE/pibl.toml"
    pid=$(<"$STATE/pibl.pid")
    # Wait for the "listening" event instead of sending a request, which would move the
    # round-robin position that `check` verifies.
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || die "pibl (PID $pid) exited during start-up"
        grep -q "listening on http://$LB_IP:$LB_PORT" "$STATE/pibl.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "listening on" "$STATE/pibl.log" 2>/dev/null ||
        die "pibl (PID $pid) did not start listening within 15 s"
    log "  pibl up in $NS_LB at http://$LB_IP:$LB_PORT (PID $pid)"
    grep -h "backend " "$STATE/pibl.log" | sed 's/^/    /'
    log "  client namespace: $NS_CLIENT ($CLIENT_IP); try:"
    log "    ip netns exec $NS_CLIENT curl -si http://$LB_IP:$LB_PORT/api/info"
}

# -- check ----------------------------------------------------------------------------

do_check() {
    local ns i name failures=0 seq=() first expected token body_ok who
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" || die "namespace $ns does not exist; run '$0 up' first"
    done
    log "== check: from $NS_CLIENT ($CLIENT_IP) through PIBL at http://$LB_IP:$LB_PORT"

    for ((i = 1; i <= REQUESTS; i++)); do
        http "$NS_CLIENT" GET "http://$LB_IP:$LB_PORT/api/info"
        name=$(json_replica "$HTTP_BODY")
        log "  request $i: GET /api/info -> $HTTP_STATUS, X-Replica: ${HTTP_REPLICA:--}, body replica: ${name:--}"
        if [[ $HTTP_STATUS != 200 || -z $name || $name != "$HTTP_REPLICA" ]]; then
            failures=$((failures + 1))
        fi
        seq+=("${name:--}")
    done
    log "  round robin: ${seq[*]}"
    # Strict rotation over the three replicas, whatever the starting point (the first
    # check after `up` starts at replica-1).
    first=${seq[0]#replica-}
    expected=()
    if [[ $first =~ ^[1-3]$ ]]; then
        for ((i = 0; i < REQUESTS; i++)); do
            expected+=("replica-$(((first - 1 + i) % 3 + 1))")
        done
    fi
    if [[ ${seq[*]} == "${expected[*]}" ]]; then
        log "  round robin: OK"
    else
        log "  round robin: FAILED (expected a strict rotation over replica-1..3)"
        failures=$((failures + 1))
    fi

    http "$NS_CLIENT" GET "http://$LB_IP:$LB_PORT/api/echo"
    if [[ $HTTP_BODY == *"\"x-forwarded-for\",\"$CLIENT_IP\""* ]]; then
        log "  X-Forwarded-For: ${HTTP_REPLICA:--} saw the client address $CLIENT_IP: OK"
    else
        log "  X-Forwarded-For: FAILED (status $HTTP_STATUS, client address not in /api/echo)"
        failures=$((failures + 1))
    fi

    token="netns-$$-$RANDOM$RANDOM"
    http "$NS_CLIENT" POST "http://$LB_IP:$LB_PORT/api/guestbook" \
        "{\"name\": \"netns-topology\", \"message\": \"$token\"}"
    who=${HTTP_REPLICA:--}
    if [[ $HTTP_STATUS == 201 ]]; then
        log "  guestbook: POST /api/guestbook through PIBL -> 201 from $who"
    else
        log "  guestbook: POST /api/guestbook through PIBL -> $HTTP_STATUS: FAILED"
        failures=$((failures + 1))
    fi
    body_ok=0
    for i in 0 1 2; do
        # Read each replica directly from the proxy's host (as the firewall would allow).
        http "$NS_LB" GET "http://${APP_IPS[i]}:$APP_PORT/api/guestbook?limit=20"
        if [[ $HTTP_STATUS == 200 && $HTTP_BODY == *"$token"* ]]; then
            log "  guestbook: replica-$((i + 1)) at ${APP_IPS[i]} lists the entry: OK"
            body_ok=$((body_ok + 1))
        else
            log "  guestbook: replica-$((i + 1)) at ${APP_IPS[i]} -> $HTTP_STATUS, entry missing: FAILED"
            failures=$((failures + 1))
        fi
    done

    log "== summary"
    log "  topology : client $CLIENT_IP -> pibl $LB_IP:$LB_PORT -> replicas ${APP_IPS[*]} port $APP_PORT"
    log "  balance  : ${seq[*]}"
    log "  guestbook: written via $who, visible on $body_ok of 3 replicas"
    if ((failures == 0)); then
        log "  result   : PASS"
        return 0
    fi
    log "  result   : FAIL ($failures problem(s))"
    return 1
}

# -- down -----------------------------------------------------------------------------

do_down() {
    local name pidfile pid ns leftovers
    log "== down: ${PREFIX}* namespaces, state in $STATE"
    # PIBL first (it drains its connections), then the replicas.
    for name in pibl app1 app2 app3; do
        pidfile=$STATE/$name.pid
        [[ -f $pidfile ]] || continue
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid"; then
            stop_pid "$pid" "$name"
        fi
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
    # Deleting a namespace removes its links; the bridge's namespace goes last.
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
    for name in pibl app1 app2 app3; do
        [[ -f $STATE/$name.pid ]] || continue
        pid=$(<"$STATE/$name.pid")
        if alive "$pid"; then log "$name: running (PID $pid)"; else log "$name: not running"; fi
    done
}

# -- main -----------------------------------------------------------------------------

main() {
    local cmd=${1:-}
    case $cmd in
    up)
        preflight
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

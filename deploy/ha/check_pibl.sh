#!/bin/sh
# Health check of the PIBL node this script runs on, for keepalived's vrrp_script (see
# keepalived.conf.example and README.md in this directory). Exit 0: PIBL is serving;
# exit 1: it is not, and this node should not hold the virtual IP.
#
# Two requests, each bounded by a short timeout:
#   1. the admin listener's GET /health must answer 200 (the PIBL process is up and its
#      event loop responsive);
#   2. a request through the proxy port must answer 2xx or 3xx (PIBL accepts clients and
#      reaches at least one backend; 502/503/504 mean it cannot).
#
# Usage: check_pibl.sh [ADMIN_URL [PROXY_URL]]
#   ADMIN_URL  default $PIBL_CHECK_ADMIN_URL or http://127.0.0.1:9090/health
#   PROXY_URL  default $PIBL_CHECK_PROXY_URL or http://127.0.0.1:8080/health
#              (a path every backend answers cheaply; it is forwarded to one of them)
# Environment:
#   PIBL_CHECK_TIMEOUT  seconds allowed per request (default 1; decimals allowed)
#   PIBL_CHECK_QUIET=1  print nothing (keepalived discards the output anyway)
#
# Needs curl. Use the node's own addresses, never the virtual IP: the check must say
# whether THIS node can serve, whichever node holds the address at the moment.

ADMIN_URL=${1:-${PIBL_CHECK_ADMIN_URL:-http://127.0.0.1:9090/health}}
PROXY_URL=${2:-${PIBL_CHECK_PROXY_URL:-http://127.0.0.1:8080/health}}
TIMEOUT=${PIBL_CHECK_TIMEOUT:-1}

say() {
    [ "${PIBL_CHECK_QUIET:-0}" = 1 ] || printf 'check_pibl: %s\n' "$*" >&2
}

if ! command -v curl >/dev/null 2>&1; then
    say "curl not found"
    exit 1
fi

# status URL: print the HTTP status code (000 when there was no HTTP answer)
status() {
    curl --silent --noproxy '*' --connect-timeout "$TIMEOUT" --max-time "$TIMEOUT" \
        --header 'Cache-Control: no-cache' --output /dev/null --write-out '%{http_code}' \
        "$1" 2>/dev/null || true
}

code=$(status "$ADMIN_URL")
if [ "$code" != 200 ]; then
    say "admin $ADMIN_URL -> ${code:-000} (expected 200)"
    exit 1
fi

code=$(status "$PROXY_URL")
case $code in
2?? | 3??) ;;
*)
    say "proxy $PROXY_URL -> ${code:-000} (expected 2xx or 3xx)"
    exit 1
    ;;
esac

say "ok (admin 200, proxy $code)"
exit 0

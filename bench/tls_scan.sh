#!/usr/bin/env bash
# Scan PIBL's HTTPS listener with sslscan and summarise what it accepts.
#
#   bash bench/tls_scan.sh                 # start PIBL, scan it, print a summary
#   bash bench/tls_scan.sh --full          # also print sslscan's own report
#   bash bench/tls_scan.sh --report FILE   # only summarise a saved "sslscan --no-colour" report
#
# Environment: PYTHON (default: the checkout's .venv python, else python3),
# KEEP_TMP=1 keeps the temporary directory (certificates, config, logs, raw report).
#
# Exit status: 0 when only TLS 1.2/1.3 are accepted and no weak cipher is offered,
# 1 when SSLv2/SSLv3/TLS 1.0/TLS 1.1 is enabled or a weak cipher is accepted,
# 2 when the scan could not be run. All traffic stays on 127.0.0.1.
# shellcheck disable=SC2317  # cleanup and stop_pid run from traps
set -euo pipefail

FULL=0
SAVED=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --full) FULL=1 ;;
        --report)
            if [[ $# -lt 2 ]]; then
                echo "tls_scan: --report needs a file" >&2
                exit 2
            fi
            SAVED="$2"
            shift
            ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "tls_scan: unknown argument: $1" >&2
            exit 2
            ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

TMP=""
PIDS=()

die() {
    echo "tls_scan: $*" >&2
    exit 2
}

# ------------------------------------------------------------------ helpers

install_sslscan() {
    command -v sslscan >/dev/null 2>&1 && return 0
    [[ "$(id -u)" == 0 ]] || die "sslscan is not installed (apt-get install sslscan, as root)"
    command -v apt-get >/dev/null 2>&1 || die "sslscan is not installed and apt-get is missing"
    echo "tls_scan: installing sslscan" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y sslscan >/dev/null; then
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y sslscan >/dev/null
    fi
    command -v sslscan >/dev/null 2>&1 || die "installing sslscan failed"
}

stop_pid() {  # SIGTERM, up to 5 s, then SIGKILL
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ -n "$TMP" ]]; then
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            echo "tls_scan: files kept in $TMP" >&2
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$status"
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {  # wait_port PORT PID: until 127.0.0.1:PORT accepts, while PID lives (10 s)
    local port="$1" pid="$2"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------------ PIBL + backend, then scan

scan() {
    install_sslscan
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/pibl-tls-scan.XXXXXX")"
    REPORT="$TMP/sslscan.txt"

    "$PY" -m pibl.certs --dir "$TMP/certs" >/dev/null || die "python -m pibl.certs failed"

    local backend_port http_port
    backend_port="$(free_port)"
    http_port="$(free_port)"
    TLS_PORT="$(free_port)"
    while [[ "$http_port" == "$backend_port" ]]; do http_port="$(free_port)"; done
    while [[ "$TLS_PORT" == "$backend_port" || "$TLS_PORT" == "$http_port" ]]; do
        TLS_PORT="$(free_port)"
    done

    mkdir -p "$TMP/www"
    echo "tls scan backend" >"$TMP/www/index.html"
    "$PY" -m http.server --bind 127.0.0.1 --directory "$TMP/www" "$backend_port" \
        >"$TMP/backend.log" 2>&1 &
    PIDS+=("$!")
    wait_port "$backend_port" "${PIDS[-1]}" || die "the backend did not start ($TMP/backend.log)"

    cat >"$TMP/pibl.toml" <<EOF
[server]
host = "127.0.0.1"
port = $http_port
workers = 1

[log]
file = "$TMP/access.log"
stdout = false

[health]
enabled = false

[cache]
enabled = false

[tls]
port = $TLS_PORT
cert = "$TMP/certs/cert.pem"
key = "$TMP/certs/key.pem"

[[backends]]
url = "http://127.0.0.1:$backend_port"
EOF

    (cd "$TMP" && exec "$PY" -m pibl run --config "$TMP/pibl.toml" --workers 1) \
        >"$TMP/pibl.out" 2>&1 &
    PIDS+=("$!")
    if ! wait_port "$TLS_PORT" "${PIDS[-1]}"; then
        sed 's/^/  pibl: /' "$TMP/pibl.out" >&2
        die "PIBL did not open its HTTPS port $TLS_PORT"
    fi

    # the listener really proxies over TLS before it is scanned
    if command -v curl >/dev/null 2>&1; then
        local body
        body="$(curl -sS --max-time 5 --cacert "$TMP/certs/ca.pem" \
            "https://127.0.0.1:$TLS_PORT/")" || die "HTTPS request through PIBL failed"
        [[ "$body" == "tls scan backend" ]] || die "unexpected body through PIBL: $body"
    fi

    sslscan --no-colour "127.0.0.1:$TLS_PORT" >"$REPORT" 2>&1 ||
        die "sslscan failed: $(tail -3 "$REPORT")"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n "$SAVED" ]]; then
    [[ -r "$SAVED" ]] || die "cannot read $SAVED"
    REPORT="$SAVED"
    # "Testing SSL server 127.0.0.1 on port 40885 using SNI name 127.0.0.1"
    TLS_PORT="$(awk '$1 == "Testing" { for (i = 1; i < NF; i++) if ($i == "port") { print $(i + 1); exit } }' "$REPORT")"
    TLS_PORT="${TLS_PORT:-?}"
else
    scan
fi
grep -q "SSL/TLS Protocols" "$REPORT" || die "no protocol list in the sslscan report: $(tail -3 "$REPORT")"
if [[ "$FULL" == 1 ]]; then
    cat "$REPORT"
    echo
fi

# ------------------------------------------------------------------ summary

# "TLSv1.0   disabled"
declare -A STATE
ACCEPTED_PROTOCOLS=()
BAD_PROTOCOLS=()
for proto in SSLv2 SSLv3 TLSv1.0 TLSv1.1 TLSv1.2 TLSv1.3; do
    state="$(awk -v p="$proto" '$1 == p && NF == 2 { print $2; exit }' "$REPORT")"
    STATE[$proto]="${state:-unknown}"
    if [[ "${STATE[$proto]}" == enabled ]]; then
        ACCEPTED_PROTOCOLS+=("$proto")
        case "$proto" in SSLv2 | SSLv3 | TLSv1.0 | TLSv1.1) BAD_PROTOCOLS+=("$proto") ;; esac
    fi
done

# "Accepted  TLSv1.2  128 bits  ECDHE-ECDSA-AES128-GCM-SHA256 Curve 25519 DHE 253"
#  -> "TLSv1.2 128 ECDHE-ECDSA-AES128-GCM-SHA256 Curve 25519 DHE 253"
CIPHERS="$(awk '($1 == "Preferred" || $1 == "Accepted") && $4 == "bits" {
    line = $2 " " $3 " " $5
    for (i = 6; i <= NF; i++) line = line " " $i
    print line
}' "$REPORT")"
CIPHER_COUNT="$(grep -c . <<<"$CIPHERS" || true)"
# Weak: under 128 bits; NULL, export, anonymous, RC4, (3)DES, MD5, IDEA or SEED suites;
# finite-field DHE under 2048 bits; before TLS 1.3, suites without (EC)DHE key exchange
# (no forward secrecy).
WEAK="$(awk '{
    why = ""
    if ($2 + 0 < 128) why = "short key"
    else if ($3 ~ /NULL|EXP|anon|ADH|AECDH|RC4|DES|MD5|IDEA|SEED/) why = "broken algorithm"
    else if ($4 == "DHE" && $5 + 0 < 2048) why = "small DH group"
    else if ($1 != "TLSv1.3" && $3 !~ /^(ECDHE|DHE|EDH)-/) why = "no forward secrecy"
    if (why != "") print "    " $1 " " $3 " (" $2 " bits): " why
}' <<<"$CIPHERS")"
NON_AEAD="$(awk '$1 != "TLSv1.3" && $3 !~ /GCM|CHACHA20|CCM/ { n++ } END { print n + 0 }' <<<"$CIPHERS")"
PREFERRED="$(awk '$1 == "Preferred" { printf "%s%s %s", sep, $2, $5; sep = ", " }' "$REPORT")"

field() {  # the value after "Label:" in the certificate section
    awk -v label="$1" 'index($0, label ":") == 1 { sub(/^[^:]*:[ \t]*/, ""); print; exit }' "$REPORT"
}
section() {  # the lines under an sslscan heading such as "  TLS renegotiation:", joined
    awk -v head="$1" '
        found && NF == 0 { exit }
        found { printf "%s%s", sep, $0; sep = "; " }
        $0 ~ "^[ \t]*" head ":[ \t]*$" { found = 1 }
    ' "$REPORT"
}

KEY_TYPE="unknown"
if [[ -n "$(field "ECC Curve Name")" ]]; then
    KEY_TYPE="ECDSA $(field "ECC Curve Name") ($(field "ECC Key Strength") bits security)"
elif [[ -n "$(field "RSA Key Strength")" ]]; then
    KEY_TYPE="RSA $(field "RSA Key Strength") bits"
fi

echo "sslscan $(field "Version" | awk '{ print $1 }') against PIBL at 127.0.0.1:$TLS_PORT"
echo "  accepted protocols: ${ACCEPTED_PROTOCOLS[*]:-none}"
for proto in SSLv2 SSLv3 TLSv1.0 TLSv1.1; do
    printf '  %-20s%s\n' "$proto" "${STATE[$proto]}"
done
echo "  accepted ciphers:   $CIPHER_COUNT (before TLS 1.3 without AEAD: $NON_AEAD)"
echo "  preferred:          ${PREFERRED:-none}"
if [[ -n "$WEAK" ]]; then
    echo "  weak ciphers:"
    echo "$WEAK"
else
    echo "  weak ciphers:       none"
fi
echo "  certificate key:    $KEY_TYPE, signature $(field "Signature Algorithm")"
echo "  altnames:           $(field "Altnames")"
echo "  renegotiation:      $(section "TLS renegotiation")"
echo "  compression:        $(section "TLS Compression")"
echo "  fallback SCSV:      $(section "TLS Fallback SCSV")"
echo "  heartbleed:         $(section "Heartbleed")"

status=0
for proto in SSLv2 SSLv3 TLSv1.0 TLSv1.1; do
    if [[ "${STATE[$proto]}" == unknown ]]; then
        echo "ERROR: the report says nothing about $proto"
        status=2
    fi
done
if [[ "${#BAD_PROTOCOLS[@]}" -gt 0 ]]; then
    echo "FAIL: obsolete protocols enabled: ${BAD_PROTOCOLS[*]}"
    status=1
fi
if [[ -n "$WEAK" ]]; then
    echo "FAIL: weak ciphers accepted"
    status=1
fi
if [[ "$status" == 0 ]]; then
    echo "OK: only ${ACCEPTED_PROTOCOLS[*]} accepted, no weak ciphers"
fi
exit "$status"

#!/usr/bin/env bash
# Installs what PIBL needs into ./.venv (and, with --test, the Debian packages the
# test suite drives: Chromium for the browser tests, iproute2 for the namespace topology,
# nghttp2-client (nghttp, h2load) for the HTTP/2 tests). With --compiled, also compiles the
# request path with mypyc (scripts/build_compiled.py; PIBL_PURE_PYTHON=1 still runs the source).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_compiled=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        --compiled) want_compiled=1 ;;
        *)
            echo "usage: scripts/install.sh [--test] [--compiled]" >&2
            exit 2
            ;;
    esac
done

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "install.sh: missing Debian packages (${missing[*]}); run as root or install them" >&2
        return 0
    fi
    echo "install.sh: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq "${missing[@]}" >/dev/null
    }
}

if ((want_test)) && command -v apt-get >/dev/null; then
    apt_install chromium chromium-driver iproute2 curl redis-server nghttp2-client
fi
if ((want_compiled)) && ! command -v cc >/dev/null && command -v apt-get >/dev/null; then
    apt_install gcc # mypyc's output is C
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
extras="app"
((want_test)) && extras="app,dev"

# The package is installed in editable mode, so code changes need no reinstall; only a
# changed pyproject.toml (or more extras) does. The stamp records what was installed.
stamp=.venv/.pibl-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras}"
have=$(cat "$stamp" 2>/dev/null || true)
if [[ "$have" != "$want" && "$have" != "${want% *} app,dev" ]]; then
    echo "install.sh: installing PIBL and its dependencies (.[${extras}]) into ./.venv"
    log=.venv/install.log
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # pip and setuptools are chatty even when all goes well (an editable-install notice
    # of ten lines): keep their output in a log and show it only when something failed
    if ! .venv/bin/python -m pip install -q -e ".[${extras}]" >"$log" 2>&1; then
        cat "$log" >&2
        echo "install.sh: pip install failed (output above, also in $log)" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
fi
.venv/bin/python -c "import pibl, httptools, pydantic" >/dev/null

if ((want_compiled)); then
    # mypyc ships with mypy (in the dev extra); an install without it gets it here
    if ! .venv/bin/python -c "import mypyc" >/dev/null 2>&1; then
        echo "install.sh: installing mypy (for mypyc) into ./.venv"
        .venv/bin/python -m pip install -q "mypy>=1.10" >>.venv/install.log 2>&1
    fi
    .venv/bin/python scripts/build_compiled.py
fi

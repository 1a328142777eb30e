#!/usr/bin/env bash
# Start the whole system on this machine: three app replicas and PIBL on :8080.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/pibl demo "$@"

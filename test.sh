#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh --test
# quiet by default; a -q, -v or --quiet/--verbose of the caller replaces it (pytest adds them
# up, and -q -q would hide the result line)
quiet=(-q)
for arg in "$@"; do
    case "$arg" in
        -q* | -v* | --quiet | --verbose) quiet=() ;;
    esac
done
exec .venv/bin/python -m pytest "${quiet[@]}" -p no:cacheprovider "$@"

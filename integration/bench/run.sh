#!/usr/bin/env bash
# make bench: meshproxy vs haproxy, nginx and stunnel on this machine (see README.md).
#   integration/bench/run.sh [--quick] [--only SCENARIO] [--reps N] [--keep]
set -euo pipefail
cd "$(dirname "$0")/../.."
integration/bench/setup.sh
exec .venv/bin/python -m integration.bench.run "$@"

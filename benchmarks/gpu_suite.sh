#!/usr/bin/env bash
# The GPU suite on a lent GPU machine: its own python3 and packages, this checkout imported from its
# path, nothing installed. Arguments go to benchmarks/gpu_suite.py (--out DIR, --budget-s S, --only STEPS).
#   bash benchmarks/gpu_suite.sh --out "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_suite.py "$@"

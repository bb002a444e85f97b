#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite: ruff, then pytest, one worker per
# core (at most 4, pytest-xdist; each worker and the processes its tests start use one thread).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `-n 0` (no workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 "$@"

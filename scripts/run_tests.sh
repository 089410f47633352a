#!/usr/bin/env bash
# Runs the test suite; pytest's "no tests collected" (exit 5) counts as a failure.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=12 "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit $rc

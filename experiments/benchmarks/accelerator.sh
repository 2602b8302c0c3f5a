#!/usr/bin/env bash
# The accelerator benchmarks in one go, within 8 minutes on one GPU or TPU host (issue #19):
#
#   bash experiments/benchmarks/accelerator.sh [OUT_DIR] [accelerator.py options, e.g. --size tiny]
#
# OUT_DIR defaults to $OUT (the lent machine's return folder), else experiments/results/accelerator.
# Needs the project installed (pip install -e . with jax for the accelerator); reaches nothing outside.
# The Python side stops starting sections after --budget_s (420 s); `timeout` is the hard stop, and
# the table it rewrites after every section survives either.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-experiments/results/accelerator}}"
shift $(( $# > 0 ? 1 : 0 ))
export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=10 470 python -m experiments.benchmarks.accelerator --out "$out" "$@"
status=$?
if [ "$status" -ne 0 ]; then
  echo "accelerator.sh: the benchmark exited with status $status (124: stopped by the 470 s timeout);" \
       "the finished rows are in $out/accelerator.md" >&2
fi
cat "$out/accelerator.md" 2>/dev/null
exit "$status"

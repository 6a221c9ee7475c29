#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against the real binary (SIPp and
# the other real peers included), and a one-iteration smoke run of the benchmarks. Installs
# what the tests need when missing. Ends with one summary line over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/ensure-deps.sh --test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status

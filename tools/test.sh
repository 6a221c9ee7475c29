#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against the real binary, and a
# one-iteration smoke run of the benchmarks. Installs what the tests need when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/ensure-deps.sh --test
cargo test --all-targets --no-fail-fast "$@"

#!/usr/bin/env bash
# Builds callforge and starts it on its embedded defaults (HTTP on 127.0.0.1:8080, ./scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/ensure-deps.sh
exec cargo run --release --bin callforge -- serve "$@"

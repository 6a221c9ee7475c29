#!/usr/bin/env bash
# Builds callforge and starts it. Without a callforge.toml: the embedded default (HTTP on
# 127.0.0.1:8080, SIP on 127.0.0.1:5060 with the demo routes of scripts/demo.toml); it prints
# how to call them. Arguments go to `callforge serve` (e.g. --sip udp:127.0.0.1:5070).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/ensure-deps.sh
exec cargo run --release --bin callforge -- serve "$@"

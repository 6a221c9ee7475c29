#!/usr/bin/env bash
# Class 4 redirect load: SIPp sends INVITEs to the realistic 5-carrier routing script
# (scripts/routing.js + tests/sipp/carriers.toml, a fresh context per call); each gets a
# 302 and an ACK. Prints calls/s, failures and server CPU per call.
# Usage: tests/load/sipp_class4.sh [rate=10000] [seconds=5]
rate=${1:-10000}
secs=${2:-5}
. "$(dirname "$0")/sipp_common.sh"
run_sipp load_redirect 447700900555 "$rate" $(( rate * secs ))

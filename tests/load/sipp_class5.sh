#!/usr/bin/env bash
# Class 5 set-up + tear-down load: INVITE, 200 with SDP (an RTP port bound per call), ACK,
# the script hangs up at once: BYE, 200. Prints calls/s, failures and server CPU per call.
# Usage: tests/load/sipp_class5.sh [rate=1000] [seconds=5]
rate=${1:-1000}
secs=${2:-5}
. "$(dirname "$0")/sipp_common.sh"
run_sipp class5_script_bye 5000 "$rate" $(( rate * secs ))

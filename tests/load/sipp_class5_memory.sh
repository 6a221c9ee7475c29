#!/usr/bin/env bash
# Memory after an overload: class5 set-up + tear-down at a rate over the machine's CPU, with
# the server's resident memory sampled every 200 ms; prints the peak and the RSS 30 s after
# the run ended (what the engine hands back once the load is gone).
# Usage: tests/load/sipp_class5_memory.sh [rate=5000] [seconds=5]
rate=${1:-5000}
secs=${2:-5}
. "$(dirname "$0")/sipp_common.sh"
rss_kb() { awk '/^VmRSS/ {print $2}' /proc/$pid/status; }
( peak=0; while kill -0 $pid 2>/dev/null; do r=$(rss_kb); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" > "$work/peak"; sleep 0.2; done ) &
sampler=$!
run_sipp class5_script_bye 5000 "$rate" $(( rate * secs ))
echo "RSS at the end of the run: $(( $(rss_kb) / 1024 )) MiB"
sleep 30
echo "RSS peak: $(( $(cat "$work/peak") / 1024 )) MiB; 30 s after the run: $(( $(rss_kb) / 1024 )) MiB"
kill $sampler 2>/dev/null || true

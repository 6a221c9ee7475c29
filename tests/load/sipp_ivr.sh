#!/usr/bin/env bash
# Class 5 IVR under load: SIPp places calls that are answered, hear a 3 s prompt, press one
# digit (RFC 4733 from SIPp's pcap) and are hung up by the script, whose BYE must carry the
# digit. Meanwhile probe calls measure the pacing of the RTP callforge sends, and the server's
# resident memory is sampled at peak concurrency.
# Usage: tests/load/sipp_ivr.sh [calls_per_second] [total_calls]   (defaults: 250, 6000)
set -euo pipefail
cd "$(dirname "$0")/../.."
rate=${1:-250}
total=${2:-6000}
# CALLFORGE_BIN=path serves a prebuilt binary instead (A/B comparisons of two builds).
bin=${CALLFORGE_BIN:-target/release/callforge}
cargo build --release --quiet --bin callforge --example rtp_probe
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(( 20000 + RANDOM % 20000 ))
http=$(( port + 1 ))
cat > "$work/callforge.toml" <<TOML
[http]
listen = "127.0.0.1:$http"
[sip]
listen = ["udp:127.0.0.1:$port"]
[media]
recordings = "$work/recordings"
[store]
path = "$work/callforge.db"
[[route]]
match = "^8000$"
script = "load_ivr.js"
mode = "class5"
[[route]]
match = "^8001$"
script = "load_probe.js"
mode = "class5"
TOML
"$bin" serve --config "$work/callforge.toml" --scripts scripts >"$work/out.log" 2>"$work/err.log" &
pid=$!
for _ in $(seq 100); do grep -q "sip listening" "$work/out.log" 2>/dev/null && break; sleep 0.1; done
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
fds() { ls /proc/$pid/fd | wc -l; }
base=$(rss_kib)
base_fds=$(fds)
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
sed "s#tests/fixtures/#$PWD/tests/fixtures/#" tests/sipp/ivr_load.xml > "$work/ivr_load.xml"
start=$(date +%s.%N)
( cd "$work" && exec sipp 127.0.0.1:$port -sf ivr_load.xml -s 8000 -i 127.0.0.1 -p $(( port + 2 )) -mp $(( port + 4 )) \
    -r "$rate" -l $(( rate * 6 )) -m "$total" -timeout 300s -timeout_error -nostdin \
    -trace_stat -stf stat.csv -fd 1 -trace_err -error_file errors.log >/dev/null 2>&1 ) &
sipp_pid=$!
# Let concurrency build up (calls last ~4 s), then probe pacing and memory at the plateau.
sleep 8
peak=$(rss_kib)
# Each live call holds two UDP sockets (RTP and RTCP).
live=$(( ($(fds) - base_fds) / 2 ))
probe=$(target/release/examples/rtp_probe 127.0.0.1:$port 8001 10 5 2>&1 | tail -1)
wait "$sipp_pid" || true
end=$(date +%s.%N)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
stats=$(tail -1 "$work/stat.csv")
header=$(head -1 "$work/stat.csv")
col() { echo "$header" | tr ';' '\n' | grep -nx "$1" | cut -d: -f1; }
val() { echo "$stats" | cut -d';' -f"$(col "$1")"; }
created=$(val "TotalCallCreated"); ok=$(val "SuccessfulCall(C)"); failed=$(val "FailedCall(C)")
echo "calls: created $created, successful $ok, failed $failed (offered $rate/s; $live calls live when sampled)"
echo "$probe"
echo "memory: baseline ${base} KiB, with $live live calls ${peak} KiB -> $(( (peak - base) / (live > 0 ? live : 1) )) KiB per live call"
echo "server CPU: user $(( (u1 - u0) * 10 )) ms, system $(( (s1 - s0) * 10 )) ms for $created calls; wall $(echo "$end - $start" | bc) s"
[ "$failed" = "0" ] && [ "$ok" = "$total" ]

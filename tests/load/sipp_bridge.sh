#!/usr/bin/env bash
# Bridged calls under load: SIPp places calls to scripts/bridge_to_header.js, which answers and
# bridges each one to a SIPp far end (X-Bridge-To). Both SIPp sides play Debian's A-law pcap
# (7.08 s) back to back for the whole call, so RTP flows both ways on every leg and callforge
# relays every packet. SIPp caps the calls in flight at CONCURRENT; at the plateau the script
# counts the bridged calls from GET /v1/calls, samples the server's CPU and memory, and runs
# examples/bridge_probe: probe calls through the same route to an in-repo callee, against
# the same number of calls straight to the callee, to measure the latency the relay adds.
# Usage: tests/load/sipp_bridge.sh [concurrent] [hold_seconds]   (defaults: 250, 28)
# PROBE_CALLS (10) pairs of probe calls measure for PROBE_SECONDS (20).
# The hold is rounded up to whole plays of the pcap (28 -> 4 plays, 28.3 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
conc=${1:-250}
hold=${2:-28}
probe_calls=${PROBE_CALLS:-10}
probe_seconds=${PROBE_SECONDS:-20}
plays=$(( (hold * 1000 + 7079) / 7080 ))
hold_ms=$(( plays * 7080 ))
# Ramp up in half a hold, then keep CONCURRENT calls up for about one more hold.
rate=$(( (2 * conc * 1000 + hold_ms - 1) / hold_ms ))
total=$(( conc * 2 ))
cargo build --release --quiet --bin callforge --example bridge_probe
work=$(mktemp -d)
pid=
uas_pid=
uac_pid=
cleanup() {
  for p in $uac_pid $uas_pid $pid; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Signalling ports from 35000-39999; callforge's RTP ports stay in its default 16384-32767.
# SIPp binds its media port and the three above it (RTCP, video).
port=$(( 35000 + (RANDOM % 300) * 16 ))
http=$(( port + 1 ))
uas_port=$(( port + 2 ))
uac_port=$(( port + 3 ))
uas_media=$(( port + 4 ))
uac_media=$(( port + 8 ))
cat > "$work/callforge.toml" <<TOML
[http]
listen = "127.0.0.1:$http"
[sip]
listen = ["udp:127.0.0.1:$port"]
[store]
path = "$work/callforge.db"
[[route]]
match = "^7000$"
script = "bridge_to_header.js"
mode = "class5"
TOML
RUST_LOG=warn,callforge::voice::bridge=debug target/release/callforge serve --config "$work/callforge.toml" --scripts scripts \
  >"$work/out.log" 2>"$work/err.log" &
pid=$!
for _ in $(seq 100); do grep -q "sip listening" "$work/out.log" 2>/dev/null && break; sleep 0.1; done
grep -q "sip listening" "$work/out.log" || { echo "server did not start:"; cat "$work/err.log"; exit 1; }
sed "s/compare=\"less_than\" value=\"[0-9]*\"/compare=\"less_than\" value=\"$plays\"/" \
  tests/sipp/bridge_load_uac.xml > "$work/uac.xml"
sed "s/compare=\"less_than\" value=\"[0-9]*\"/compare=\"less_than\" value=\"$(( plays - 1 ))\"/" \
  tests/sipp/bridge_load_uas.xml > "$work/uas.xml"
common=(-i 127.0.0.1 -timeout $(( hold_ms / 1000 * 4 + 120 ))s -timeout_error -nostdin -buff_size 4194304
  -trace_stat -fd 1 -trace_err)
( cd "$work" && exec sipp -sf uas.xml -p "$uas_port" -mp "$uas_media" -m "$total" "${common[@]}" \
    -stf uas.csv -error_file uas_errors.log >/dev/null 2>uas.err ) &
uas_pid=$!
for _ in $(seq 100); do grep -q ":$(printf %04X "$uas_port") " /proc/net/udp && break; sleep 0.05; done
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/$pid/stat; }
base=$(rss_kib)
start=$(date +%s.%N)
( cd "$work" && exec sipp "127.0.0.1:$port" -sf uac.xml -s 7000 -key uas "127.0.0.1:$uas_port" \
    -p "$uac_port" -mp "$uac_media" -r "$rate" -l "$conc" -m "$total" "${common[@]}" \
    -stf uac.csv -error_file uac_errors.log >/dev/null 2>uac.err ) &
uac_pid=$!
sleep 1
kill -0 "$uac_pid" 2>/dev/null || { echo "SIPp UAC did not start:"; cat "$work/uac_errors.log" "$work/uac.err"; exit 1; }
# The plateau starts once the ramp (half a hold) is over.
sleep $(( hold_ms / 2000 + 4 ))
bridged() {
  curl -s "http://127.0.0.1:$http/v1/calls" |
    python3 -c 'import json,sys; print(sum(c["state"] == "bridged" for c in json.load(sys.stdin)["calls"]))'
}
live0=$(bridged)
tck=$(getconf CLK_TCK)
c0=$(cpu_ticks); t0=$(date +%s.%N)
target/release/examples/bridge_probe "127.0.0.1:$port" 7000 "$probe_calls" "$probe_seconds" \
  >"$work/probe.out" 2>"$work/probe.err" &
probe_pid=$!
# Mid-probe: the probe's bridged calls are up too.
sleep $(( probe_seconds / 2 + 2 ))
live1=$(bridged)
peak=$(rss_kib)
wait "$probe_pid" || true
c1=$(cpu_ticks); t1=$(date +%s.%N)
load=$(cut -d' ' -f1-3 /proc/loadavg)
wait "$uac_pid" || true
uac_pid=
wait "$uas_pid" || true
uas_pid=
end=$(date +%s.%N)
col() { # CSV COLUMN: the last row's value of that column of a SIPp statistics file
  python3 -c 'import sys; rows=[l.rstrip("\n").split(";") for l in open(sys.argv[1]) if l.strip()]; print(rows[-1][rows[0].index(sys.argv[2])])' "$work/$1" "$2"
}
uac_ok=$(col uac.csv "SuccessfulCall(C)"); uac_failed=$(col uac.csv "FailedCall(C)")
uas_ok=$(col uas.csv "SuccessfulCall(C)"); uas_failed=$(col uas.csv "FailedCall(C)")
echo "offered: $conc concurrent (sipp -l), $rate calls/s ramp, $plays plays of 7.08 s per call, $total calls"
echo "caller side (SIPp UAC): $uac_ok successful, $uac_failed failed; far end (SIPp UAS): $uas_ok successful, $uas_failed failed"
echo "bridged calls live (GET /v1/calls): $live0 before the probe, $live1 during it ($probe_calls of them probe calls)"
cat "$work/probe.out"
[ -s "$work/probe.err" ] && sed 's/^/probe: /' "$work/probe.err" | head -5
python3 - "$c0" "$c1" "$t0" "$t1" "$tck" <<'PY'
import sys
c0, c1, t0, t1, tck = map(float, sys.argv[1:])
print(f"server CPU at the plateau: {(c1 - c0) / tck / (t1 - t0) * 100:.0f}% of one core")
PY
echo "server memory: ${base} KiB idle, ${peak} KiB with $live1 bridged calls ($(( (peak - base) / (live1 > 0 ? live1 : 1) )) KiB per bridged call)"
# Every relay logs its packet counts when it stops: RTP must have crossed both ways.
python3 - "$work/err.log" <<'PY'
import re, sys
runs = [tuple(map(int, m)) for m in re.findall(r"a_to_b: (\d+), b_to_a: (\d+), dropped: (\d+)", open(sys.argv[1]).read())]
one_way = sum(1 for a, b, _ in runs if a == 0 or b == 0)
print(f"relayed: {len(runs)} bridges stopped, {sum(r[0] for r in runs)} packets caller->far end, "
      f"{sum(r[1] for r in runs)} far end->caller, {sum(r[2] for r in runs)} dropped; "
      f"{one_way} bridges with a direction that carried nothing (the probe's callee sends nothing)")
PY
echo "load average at the plateau: $load; whole run $(echo "$end - $start" | bc) s"
[ -s "$work/uac_errors.log" ] && { echo "UAC errors:"; head -20 "$work/uac_errors.log"; }
[ -s "$work/uas_errors.log" ] && { echo "UAS errors:"; head -20 "$work/uas_errors.log"; }
[ "$uac_failed" = "0" ] && [ "$uas_failed" = "0" ] && [ "$uac_ok" = "$total" ] && [ "$uas_ok" = "$total" ]

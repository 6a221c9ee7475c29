#!/usr/bin/env bash
# Bridged calls under load, RTP from plain UDP sockets (no SIPp, no raw sockets): the relay is
# what is measured. examples/bridge_load places CALLS calls to scripts/bridge_to_header.js,
# which answers and bridges each one to an in-repo far end, and plays 20 ms PCMU both ways on
# every leg from ordinary UDP sockets. Once all calls are up the script counts the bridged
# calls (GET /v1/calls), samples the server's CPU and memory, and runs examples/bridge_probe:
# probe calls through the same route against as many straight to a callee, to measure the
# latency the relay adds.
# Usage: tests/load/udp_bridge.sh [calls] [hold_seconds]   (defaults: 500, 28)
# Environment:
#   PROBE_CALLS (10) pairs of probe calls measure for PROBE_SECONDS (20; at most hold - 4).
#   BUSY=N      N busy loops (`nice -n 0`, plain shell) keep the cores busy during the run.
#   CALLFORGE_BIN  serve this binary instead of building one (A/B of two builds).
#   KEEP_LOGS=DIR  copy the server's and the examples' logs there at the end.
#   RELAY_THREADS, RELAY_PRIORITY  set [media] relay_threads / relay_priority (only when set,
#               so a build that predates them still starts).
set -euo pipefail
cd "$(dirname "$0")/../.."
calls=${1:-500}
hold=${2:-28}
probe_calls=${PROBE_CALLS:-10}
probe_seconds=${PROBE_SECONDS:-20}
busy=${BUSY:-0}
if [ -n "${CALLFORGE_BIN:-}" ]; then
  bin=$CALLFORGE_BIN
  cargo build --release --quiet --example bridge_probe --example bridge_load
else
  bin=target/release/callforge
  cargo build --release --quiet --bin callforge --example bridge_probe --example bridge_load
fi
work=$(mktemp -d)
pid=
load_pid=
hogs=()
cleanup() {
  [ -n "${KEEP_LOGS:-}" ] && mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$work"/*.out "$work"/*.err "$KEEP_LOGS"/ 2>/dev/null
  for p in "${hogs[@]}" $load_pid $pid; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
port=$(( 35000 + (RANDOM % 300) * 16 ))
http=$(( port + 1 ))
media=""
[ -n "${RELAY_THREADS:-}" ] && media+="relay_threads = $RELAY_THREADS"$'\n'
[ -n "${RELAY_PRIORITY:-}" ] && media+="relay_priority = \"$RELAY_PRIORITY\""$'\n'
cat > "$work/callforge.toml" <<TOML
[http]
listen = "127.0.0.1:$http"
[sip]
listen = ["udp:127.0.0.1:$port"]
[store]
path = "$work/callforge.db"
[media]
$media
[[route]]
match = "^7000$"
script = "bridge_to_header.js"
mode = "class5"
TOML
RUST_LOG=warn,callforge::voice::bridge=debug,callforge::media::relay_threads=info "$bin" serve \
  --config "$work/callforge.toml" --scripts scripts >"$work/out.log" 2>"$work/err.log" &
pid=$!
for _ in $(seq 100); do grep -q "sip listening" "$work/out.log" 2>/dev/null && break; sleep 0.1; done
grep -q "sip listening" "$work/out.log" || { echo "server did not start:"; cat "$work/err.log"; exit 1; }
for _ in $(seq "$busy"); do
  nice -n 0 sh -c 'while :; do :; done' &
  hogs+=($!)
done
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/$pid/stat; }
base=$(rss_kib)
start=$(date +%s.%N)
target/release/examples/bridge_load "127.0.0.1:$port" 7000 "$calls" "$hold" \
  >"$work/load.out" 2>"$work/load.err" &
load_pid=$!
for _ in $(seq 1200); do grep -q "calls up" "$work/load.out" 2>/dev/null && break; sleep 0.1; done
grep -q "calls up" "$work/load.out" || { echo "the calls did not come up:"; cat "$work/load.out"; head "$work/load.err"; exit 1; }
sleep 2
bridged() {
  curl -s "http://127.0.0.1:$http/v1/calls" |
    python3 -c 'import json,sys; print(sum(c["state"] == "bridged" for c in json.load(sys.stdin)["calls"]))'
}
live0=$(bridged)
tck=$(getconf CLK_TCK)
# The relay threads' own CPU (cf-relay-N) and the load generator's, beside the server's.
relay_ticks() {
  local sum=0 t
  for t in /proc/$pid/task/*; do
    grep -q '^cf-relay' "$t/comm" 2>/dev/null && sum=$(( sum + $(awk '{print $14 + $15}' "$t/stat") ))
  done
  echo $sum
}
gen_ticks() { awk '{print $14 + $15}' /proc/$load_pid/stat; }
c0=$(cpu_ticks); r0=$(relay_ticks); g0=$(gen_ticks); t0=$(date +%s.%N)
target/release/examples/bridge_probe "127.0.0.1:$port" 7000 "$probe_calls" "$probe_seconds" \
  >"$work/probe.out" 2>"$work/probe.err" &
probe_pid=$!
sleep $(( probe_seconds / 2 + 2 ))
live1=$(bridged)
peak=$(rss_kib)
wait "$probe_pid" || true
c1=$(cpu_ticks); r1=$(relay_ticks); g1=$(gen_ticks); t1=$(date +%s.%N)
load=$(cut -d' ' -f1-3 /proc/loadavg)
load_rc=0
wait "$load_pid" || load_rc=$?
load_pid=
end=$(date +%s.%N)
echo "offered: $calls bridged calls ($(( calls * 2 )) legs), 20 ms PCMU both ways on every leg from plain UDP sockets, held $hold s; busy loops: $busy"
[ -n "$media" ] && echo "[media] $(echo "$media" | tr '\n' ' ')"
grep -h "relay threads run" "$work/out.log" "$work/err.log" | sed 's/.*\(relay threads run\)/\1/' | head -1 || true
echo "bridged calls live (GET /v1/calls): $live0 before the probe, $live1 during it ($probe_calls of them probe calls)"
cat "$work/load.out"
[ -s "$work/load.err" ] && sed 's/^/load: /' "$work/load.err" | head -5
cat "$work/probe.out"
[ -s "$work/probe.err" ] && sed 's/^/probe: /' "$work/probe.err" | head -5
python3 - "$c0" "$c1" "$r0" "$r1" "$g0" "$g1" "$t0" "$t1" "$tck" <<'PY'
import sys
c0, c1, r0, r1, g0, g1, t0, t1, tck = map(float, sys.argv[1:])
pct = lambda a, b: (b - a) / tck / (t1 - t0) * 100
print(f"server CPU during the probe: {pct(c0, c1):.0f}% of one core, of which relay threads {pct(r0, r1):.0f}%; "
      f"load generator {pct(g0, g1):.0f}%")
PY
echo "server memory: ${base} KiB idle, ${peak} KiB with $live1 bridged calls ($(( (peak - base) / (live1 > 0 ? live1 : 1) )) KiB per bridged call)"
python3 - "$work/err.log" <<'PY'
import re, sys
runs = [tuple(map(int, m)) for m in re.findall(r"a_to_b: (\d+), b_to_a: (\d+), dropped: (\d+)", open(sys.argv[1]).read())]
one_way = sum(1 for a, b, _ in runs if a == 0 or b == 0)
print(f"relayed: {len(runs)} bridges stopped, {sum(r[0] for r in runs)} packets caller->far end, "
      f"{sum(r[1] for r in runs)} far end->caller, {sum(r[2] for r in runs)} dropped; "
      f"{one_way} bridges with a direction that carried nothing (the probe's callee sends nothing)")
PY
echo "load average at the end of the probe: $load; whole run $(echo "$end - $start" | bc) s"
[ "$load_rc" = "0" ] && [ "$live0" -ge "$calls" ]

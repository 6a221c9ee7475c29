#!/usr/bin/env bash
# Instructions per class4 call, counted with callgrind (the README's method): the server runs
# under `valgrind --tool=callgrind --instr-atstart=no`; after 50 warm-up calls counting is
# switched on for CALLS SIPp calls (tests/sipp/load_redirect.xml, INVITE 302 ACK, 5-carrier
# routing.js) at 50/s, and dumped 7 s after the last so each call's timer I cleanup counts.
# Counting instructions, not time, it gives the same figure on a busy machine.
# Usage: FAST_PATH=true|false [KEEP=file] tests/load/callgrind_class4.sh [calls=500]
set -euo pipefail
cd "$(dirname "$0")/../.."
calls=${1:-500}
command -v valgrind >/dev/null || { echo "valgrind missing" >&2; exit 1; }
bin=${CALLFORGE_BIN:-target/release/callforge}
[ -n "${CALLFORGE_BIN:-}" ] || cargo build --release --quiet --bin callforge
work=$(mktemp -d)
mkdir -p "$work/scripts"
cp scripts/*.js scripts/*.toml tests/sipp/carriers.toml "$work/scripts/"
cat > "$work/callforge.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:0"]
${FAST_PATH:+fast_path = $FAST_PATH}
[limits]
worker_niceness = 0
[[route]]
match = "^44"
script = "routing.js"
mode = "class4"
vars = "carriers.toml"
[gateways]
alpha = "sip:alpha.example.net:5060"
bravo = "sip:bravo.example.net:5060"
charlie = "sip:charlie.example.net:5060"
delta = "sip:delta.example.net:5060"
echo = "sip:echo.example.net:5060"
TOML
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
  "$bin" serve --config "$work/callforge.toml" --scripts "$work/scripts" --http 127.0.0.1:0 \
  >"$work/out" 2>"$work/err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 600); do grep -q "sip listening on udp" "$work/out" 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/^callforge sip listening on udp:127.0.0.1://p' "$work/out")
[ -n "$port" ] || { echo "server did not start:"; cat "$work/err"; exit 1; }
run() {
  local lport=$(( 30000 + RANDOM % 20000 ))
  sipp "127.0.0.1:$port" -sf tests/sipp/load_redirect.xml -s 447700900555 -i 127.0.0.1 -p "$lport" \
    -mp $(( lport + 2 )) -r 50 -m "$1" -timeout 120s -timeout_error -nostdin >/dev/null 2>&1
}
run 50
callgrind_control -i on "$pid" >/dev/null
run "$calls"
sleep 7
callgrind_control -d "$pid" >/dev/null
sleep 1
dump=$(ls "$work"/cg.out.* | sort -t. -k3 -n | tail -1)
total=$(sed -n 's/^summary: *//p; s/^totals: *//p' "$dump" | head -1 | awk '{print $1}')
echo "fast_path=${FAST_PATH:-default}: $total instructions for $calls calls = $(( total / calls )) per call"
# KEEP=FILE keeps the dump, for callgrind_annotate.
[ -z "${KEEP:-}" ] || cp "$dump" "$KEEP"

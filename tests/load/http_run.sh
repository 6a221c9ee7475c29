#!/usr/bin/env bash
# Throughput of POST /v1/run/routing?mode=class4 (the 5-carrier routing script, a fresh
# context per run) under concurrent load from wrk, against a release build on loopback.
# Usage: tests/load/http_run.sh [seconds] [connections]
# CALLFORGE_BIN=path serves a prebuilt binary instead (A/B comparisons of two builds).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
conns=${2:-64}
command -v wrk >/dev/null || { sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo; $sudo_ apt-get install -y -qq wrk; }
bin=${CALLFORGE_BIN:-target/release/callforge}
[ -n "${CALLFORGE_BIN:-}" ] || cargo build --release --quiet --bin callforge
port=$(( 20000 + RANDOM % 20000 ))
work=$(mktemp -d)
printf '[store]\npath = "%s/callforge.db"\n' "$work" > "$work/callforge.toml"
"$bin" serve --config "$work/callforge.toml" --http 127.0.0.1:$port --scripts scripts >/dev/null 2>"$work/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
lua=$(mktemp --suffix=.lua)
. tests/load/wrk_class4.sh
wrk_class4_lua "$lua"
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
wrk -t2 -c"$conns" -d"${secs}s" -s "$lua" "http://127.0.0.1:$port/v1/run/routing?mode=class4"
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
echo "server CPU over ${secs}s: user $(( (u1 - u0) * 10 )) ms, system $(( (s1 - s0) * 10 )) ms"
rm -f "$lua"

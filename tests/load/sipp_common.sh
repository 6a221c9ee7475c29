# Shared by tests/load/sipp_class4.sh and sipp_class5.sh (sourced, not run).
# Starts a release `callforge serve` with SIP on an ephemeral loopback UDP port, runs one
# SIPp scenario at a fixed rate for a bounded number of calls, and prints calls/s,
# failures and the server's CPU time per call (utime+stime from /proc/PID/stat).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v sipp >/dev/null || { echo "sipp missing: tools/ensure-deps.sh --test installs it" >&2; exit 1; }
# CALLFORGE_BIN=path runs a prebuilt binary instead (A/B comparisons of two builds).
# FAST_PATH=true|false sets `[sip] fast_path` (unset: the default).
bin=${CALLFORGE_BIN:-target/release/callforge}
[ -n "${CALLFORGE_BIN:-}" ] || cargo build --release --quiet --bin callforge
work=$(mktemp -d)
mkdir -p "$work/scripts"
cp scripts/*.js scripts/*.toml "$work/scripts/"
cp tests/sipp/carriers.toml "$work/scripts/"
printf 'async function main(d, ctx) { await ctx.answer(); await ctx.hangup(); }\n' > "$work/scripts/answer_now.js"
# A sourcing script may serve more scripts (EXTRA_SCRIPTS: files) on more routes
# (EXTRA_ROUTES: TOML appended to the config), e.g. compare_kamailio_redirect.sh.
for f in ${EXTRA_SCRIPTS:-}; do cp "$f" "$work/scripts/"; done
# The default [sip] limits (max_calls, max_transactions): the load runs on what users get.
cat > "$work/callforge.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:0"]
${FAST_PATH:+fast_path = $FAST_PATH}
[limits]
workers = ${WORKERS:-0}
${WORKERS:+class4_workers = $WORKERS}
# No media here: script workers get the same priority as SIP (callforge's default lowers
# them by 5 so RTP pacing wins on a busy machine).
worker_niceness = ${WORKER_NICENESS:-0}
[[route]]
match = "^44"
script = "routing.js"
mode = "class4"
vars = "carriers.toml"
[[route]]
match = "^5000$"
script = "answer_now.js"
mode = "class5"
[gateways]
alpha = "sip:alpha.example.net:5060"
bravo = "sip:bravo.example.net:5060"
charlie = "sip:charlie.example.net:5060"
delta = "sip:delta.example.net:5060"
echo = "sip:echo.example.net:5060"
${EXTRA_ROUTES:-}
TOML
RUST_LOG=warn "$bin" serve --config "$work/callforge.toml" --scripts "$work/scripts" \
  --http 127.0.0.1:0 >"$work/out" 2>"$work/err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "sip listening on udp" "$work/out" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/^callforge sip listening on udp:127.0.0.1://p' "$work/out")
[ -n "$port" ] || { echo "server did not start:"; cat "$work/err"; exit 1; }
tck=$(getconf CLK_TCK)

# cpu_ticks PID...: their utime and stime summed, in clock ticks ("user system").
cpu_ticks() {
  local p u s tu=0 ts=0
  for p in "$@"; do
    # Field 2 (comm) is in parentheses and may hold spaces: count from the last ')'.
    read -r u s < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
    tu=$(( tu + u )); ts=$(( ts + s ))
  done
  echo "$tu $ts"
}

# run_sipp SCENARIO SERVICE RATE CALLS
# The server under test is callforge ($port, $pid) unless the caller sets target_port and
# target_pids (every process of another server, whose CPU is summed). With settle_s set, the
# CPU window stays open that many seconds after SIPp ends, so work a server defers (timers
# of finished transactions) is charged to the run that caused it.
run_sipp() {
  local scenario=$1 service=$2 rate=$3 calls=$4
  local lport=$(( 30000 + RANDOM % 20000 ))
  rm -f "$work/stat.csv" "$work/errors.log"
  local tport=${target_port:-$port} tpids=${target_pids:-$pid}
  # shellcheck disable=SC2086 # a list of PIDs
  read -r u0 s0 < <(cpu_ticks $tpids)
  local t0; t0=$(date +%s.%N)
  set +e
  sipp "127.0.0.1:$tport" -sf "tests/sipp/$scenario.xml" -s "$service" -i 127.0.0.1 -p "$lport" \
    -mp $(( lport + 2 )) -r "$rate" -m "$calls" -l $(( rate * 4 )) -timeout 120s -timeout_error -nostdin \
    -buff_size 4194304 -trace_stat -stf "$work/stat.csv" -fd 1 -trace_err -error_file "$work/errors.log" \
    >/dev/null 2>"$work/sipp.err"
  local rc=$?
  set -e
  local t1; t1=$(date +%s.%N)
  sleep "${settle_s:-0}"
  # shellcheck disable=SC2086
  read -r u1 s1 < <(cpu_ticks $tpids)
  # 503s SIPp logged as unexpected (admission limits, shedding; a retransmitted 503 counts
  # again); failures without one are timeouts.
  local n503; n503=$(grep -c 'SIP/2.0 503' "$work/errors.log" 2>/dev/null || true)
  python3 - "$work/stat.csv" "$rc" "$t0" "$t1" "$u0" "$s0" "$u1" "$s1" "$tck" "$rate" "${n503:-0}" <<'PY'
import sys
path, rc, t0, t1, u0, s0, u1, s1, tck, rate, n503 = sys.argv[1:]
rows = [l.split(';') for l in open(path) if l.strip()]
h, last = rows[0], rows[-1]
col = lambda n: int(last[h.index(n)])
ok, failed, created = col('SuccessfulCall(C)'), col('FailedCall(C)'), col('TotalCallCreated')
wall = float(t1) - float(t0)
tck = int(tck)
user = (int(u1) - int(u0)) / tck
system = (int(s1) - int(s0)) / tck
per = (user + system) / max(ok, 1) * 1e6
print(f"target rate {rate}/s: {created} calls in {wall:.2f}s = {ok / wall:.0f} calls/s completed, "
      f"{ok} ok, {failed} failed, {n503} unexpected 503s logged (sipp exit {rc})")
# SIPp writes a row per second (-fd 1). The whole-run figure above includes SIPp's start and,
# when a datagram was lost, the 0.5 s until its retransmission; the per-second rows show the
# rate the server kept up while calls were arriving.
period = [int(r[h.index('SuccessfulCall(P)')]) for r in rows[1:]]
full = sorted(period[1:-1]) if len(period) > 2 else sorted(period)
if full:
    print(f"sustained: median {full[len(full) // 2]} calls/s completed per second of the run "
          f"(per-second counts {period})")
print(f"server CPU: user {user*1000:.0f} ms + system {system*1000:.0f} ms = {per:.0f} us per call")
PY
  # Which limits answered 503 (or shed), from callforge's own counters.
  local http; http=$(sed -n 's/^callforge http listening on //p' "$work/out" | head -1)
  if [ -z "${target_port:-}" ] && [ -n "$http" ]; then
    local hits; hits=$(curl -s "http://$http/metrics" | grep '^callforge_limit_hits' | tr '\n' ' ' || true)
    [ -z "$hits" ] || echo "limits reached (cumulative): $hits"
  fi
}

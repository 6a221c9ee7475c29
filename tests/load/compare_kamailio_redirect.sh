#!/usr/bin/env bash
# Class4 redirect CPU per call: callforge against Kamailio's native configuration language,
# by the same harness in the same run. Both serve SIP on random loopback UDP ports; SIPp
# drives each in turn with the same scenario (tests/sipp/load_redirect.xml: INVITE, 302, ACK)
# at the same rate for the same number of calls, rounds interleaved, and the CPU per call is
# utime+stime from /proc/PID/stat (for Kamailio summed over all of its processes) over the
# SIPp run plus SETTLE seconds after it (work a server defers, like callforge's timer I, is
# charged to the round that caused it).
#
# Rows, each round in this order:
#   kamailio          tools/bench/kamailio/redirect.cfg: stateless 302 with one Contact (sl):
#                     the goal of issue 15
#   kamailio-tm       the same file with -A STATEFUL: the 302 from a tm transaction, as
#                     callforge keeps one (retransmissions, ACK matching); for reference
#   callforge         scripts/routing.js, the 5-carrier class4 script (as sipp_class4.sh),
#                     a fresh context per call, three Contacts
#   callforge-1       tests/load/one_carrier.js: one carrier, one Contact, a fresh context per
#                     call (the like-for-like row for Kamailio's trivial redirect)
#
# Usage: tests/load/compare_kamailio_redirect.sh [rate=6000] [seconds=3] [rounds=3]
# Env: CALLFORGE_BIN (a prebuilt binary), SETTLE (seconds, default 6: timer I is 5 s).
# Before the rounds, each row gets one uncounted second of load (warm-up).
rate=${1:-6000}
secs=${2:-3}
rounds=${3:-3}
settle=${SETTLE:-6}
calls=$(( rate * secs ))
# The one-carrier script on its own route, beside sipp_common.sh's usual ones.
EXTRA_SCRIPTS=tests/load/one_carrier.js
EXTRA_ROUTES='[[route]]
match = "^99"
script = "one_carrier.js"
mode = "class4"'
. "$(dirname "$0")/sipp_common.sh"
command -v kamailio >/dev/null || { echo "kamailio missing: tools/ensure-deps.sh --test installs it" >&2; exit 1; }

mkdir -p "$work/kamailio" "$work/kamailio-tm"
# start_kamailio NAME [ARGS...]: sets kport and kpids (the main process and all its children).
start_kamailio() {
  local name=$1 kpid
  shift
  kport=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  kamailio -f tools/bench/kamailio/redirect.cfg "$@" -l "udp:127.0.0.1:$kport" -DD -E -M 8 \
    -Y "$work/$name" >"$work/$name.log" 2>&1 &
  kpid=$!
  kmains+=("$kpid")
  for _ in $(seq 100); do ss -lunH "sport = :$kport" | grep -q . && break; sleep 0.05; done
  ss -lunH "sport = :$kport" | grep -q . || { echo "$name did not start:"; cat "$work/$name.log"; exit 1; }
  sleep 0.5 # its children start just after the bind
  kpids="$kpid $(pgrep -P "$kpid" | tr '\n' ' ')"
  echo "$name $(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p') on udp:127.0.0.1:$kport: $(wc -w <<<"$kpids") processes, CPU summed over all"
}
kmains=()
trap 'kill $pid "${kmains[@]}" 2>/dev/null || true; wait "${kmains[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
start_kamailio kamailio -m 64
sl_port=$kport sl_pids=$kpids
# Transactions live until tm's wait timer (5 s) after the 302: 30,000 at 6,000/s.
start_kamailio kamailio-tm -m 512 -A STATEFUL
tm_port=$kport tm_pids=$kpids
echo "callforge on udp:127.0.0.1:$port ($bin)"

# One INVITE to each row first: what each answers, so the comparison can be checked.
probe() { # PORT NUMBER
  python3 - "$1" "$2" <<'PY'
import socket, sys
port, number = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(3)
me = s.getsockname()[1]
s.sendto((f"INVITE sip:{number}@127.0.0.1:{port} SIP/2.0\r\n"
          f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK-probe{me}\r\n"
          f"From: <sip:441000000000@127.0.0.1:{me}>;tag=probe\r\n"
          f"To: <sip:{number}@127.0.0.1:{port}>\r\nCall-ID: probe-{me}@127.0.0.1\r\n"
          f"CSeq: 1 INVITE\r\nContact: <sip:441000000000@127.0.0.1:{me}>\r\n"
          "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
provisional = []
while True:
    text = s.recv(65535).decode(errors="replace")
    status = text.split("\r\n", 1)[0]
    if not status.startswith("SIP/2.0 1"):
        break
    provisional.append(status.split(" ", 1)[1])
contacts = [l.split(":", 1)[1].strip() for l in text.split("\r\n") if l.lower().startswith(("contact:", "m:"))]
before = f" after {', '.join(provisional)}" if provisional else ""
print(f"  {status}{before}; {len(contacts)} Contact(s): {' | '.join(contacts)}")
PY
}
echo "What each answers (one INVITE each, before timing):"
echo "kamailio:";    probe "$sl_port" 447700900555
echo "kamailio-tm:"; probe "$tm_port" 447700900555
echo "callforge:";   probe "$port" 447700900555
echo "callforge-1:"; probe "$port" 99447700900555
echo

# one_round ROW: runs SIPp against ROW once and prints run_sipp's report.
one_round() {
  case $1 in
    kamailio) target_port=$sl_port target_pids=$sl_pids settle_s=$settle run_sipp load_redirect 447700900555 "$rate" "$calls" ;;
    kamailio-tm) target_port=$tm_port target_pids=$tm_pids settle_s=$settle run_sipp load_redirect 447700900555 "$rate" "$calls" ;;
    callforge) settle_s=$settle run_sipp load_redirect 447700900555 "$rate" "$calls" ;;
    callforge-1) settle_s=$settle run_sipp load_redirect 99447700900555 "$rate" "$calls" ;;
  esac
}

# Warm-up, not counted: one second of load on each row first, so no round pays for first
# touches (Kamailio's shared memory, callforge's transaction table), then SETTLE seconds.
for row in kamailio kamailio-tm callforge callforge-1; do
  calls=$rate settle=0 one_round "$row" >/dev/null
done
sleep "$settle"

declare -A per
for r in $(seq "$rounds"); do
  for row in kamailio kamailio-tm callforge callforge-1; do
    # A round counts only when every call completed; SIPp sometimes cannot start (its random
    # local port taken): that round is run again, twice at most.
    for try in 1 2 3; do
      out=$(one_round "$row")
      us=$(sed -n 's/.* = \([0-9]*\) us per call$/\1/p' <<<"$out")
      ok=$(sed -n 's/.*completed, \([0-9]*\) ok.*/\1/p' <<<"$out")
      printf 'round %d %-12s %5s us CPU per call  (%s)\n' "$r" "$row" "$us" "$(head -1 <<<"$out")"
      [ "$ok" = "$calls" ] && break
      echo "  ^ $ok of $calls calls completed: not counted$([ "$try" -lt 3 ] && echo ", run again")"
      us=
    done
    if [ -n "$us" ]; then per[$row]="${per[$row]:-} $us"; fi
  done
done

python3 - "$rate" "$calls" "${per[kamailio]}" "${per[callforge]}" "${per[callforge-1]}" "${per[kamailio-tm]}" <<'PY'
import statistics, sys
rate, calls, k, c, c1, kt = sys.argv[1:]
k, c, c1, kt = ([int(x) for x in v.split()] or [float("nan")] for v in (k, c, c1, kt))
mk, mc, mc1, mkt = (statistics.median(v) for v in (k, c, c1, kt))
print(f"\nmedians at {rate}/s, {calls} calls per round:")
print(f"  kamailio native one-Contact 302:       {mk:.0f} us CPU per call  {k}")
print(f"  kamailio, the same from a transaction: {mkt:.0f} us CPU per call  {kt}")
print(f"  callforge, 5-carrier routing.js:       {mc:.0f} us CPU per call  {c}")
print(f"  callforge, one-carrier script:         {mc1:.0f} us CPU per call  {c1}")
print(f"ratio callforge 5-carrier / kamailio: {mc / mk:.2f}  (goal: <= 1.00)")
print(f"ratio callforge 1-carrier / kamailio: {mc1 / mk:.2f}")
print(f"ratio callforge 1-carrier / kamailio-tm: {mc1 / mkt:.2f}")
PY

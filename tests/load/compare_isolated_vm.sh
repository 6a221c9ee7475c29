#!/usr/bin/env bash
# HTTP class4 runs/s: callforge's `POST /v1/run/routing?mode=class4` against a Node.js server
# running the same scripts/routing.js in isolated-vm (tools/bench/isolated-vm/server.js), by
# the same wrk load (2 threads, the same connections, the same body: tests/data/five_carriers.json,
# as tests/load/http_run.sh sends it) in the same run, rounds interleaved. Both merge the
# vars of scripts/routing.toml into the input and give every run a sandbox that has never run
# anything, with a 64 MiB memory limit and a 2 s limit. Before timing, one response from each
# is checked to be the same routing decision.
#
# Rows, each round in this order:
#   isolated-vm          a new V8 isolate and context per request (MODE=isolate)
#   callforge            a fresh QuickJS context per run (its only mode)
#   isolated-vm-context  a new context per request in one of two long-lived isolates
#                        (MODE=context): cheaper for the peer, but runs share a heap
#
# isolated-vm is a native addon: the first run installs it with npm into
# tools/bench/isolated-vm/node_modules (git-ignored) and node-gyp compiles it (about a minute
# on 2 cores; its prebuilt binaries are fetched from GitHub, which may be unreachable). node-gyp
# needs the headers of the running node: NodeSource's `nodejs` package ships them in
# /usr/include/node, which is used when its version matches `node -v`; otherwise node-gyp
# downloads them (tools/ensure-deps.sh --bench installs node, npm, Debian's matching headers
# and wrk when node is missing). isolated-vm 5.0.4 is pinned because it declares node >= 18
# (6.x wants node 22, 7.x node 24; this machine has 20); on node >= 20 it needs
# `--no-node-snapshot`.
#
# Usage: tests/load/compare_isolated_vm.sh [seconds=10] [connections=64] [rounds=3]
# Env: CALLFORGE_BIN (a prebuilt binary instead of building target/release/callforge).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
conns=${2:-64}
rounds=${3:-3}
for tool in node npm wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/ensure-deps.sh --bench" >&2; exit 1; }
done
bench=tools/bench/isolated-vm
if [ ! -e "$bench/node_modules/isolated-vm/out/isolated_vm.node" ]; then
  echo "installing isolated-vm into $bench/node_modules (npm ci, native build)" >&2
  hdr=/usr/include/node/node_version.h
  if [ -e "$hdr" ] && [ "v$(awk '/define NODE_(MAJOR|MINOR|PATCH)_VERSION/ {printf "%s%s", sep, $3; sep="."}' "$hdr")" = "$(node -v)" ]; then
    export npm_config_nodedir=/usr
  fi
  (cd "$bench" && npm ci --no-audit --no-fund >&2)
fi
bin=${CALLFORGE_BIN:-target/release/callforge}
[ -n "${CALLFORGE_BIN:-}" ] || cargo build --release --quiet --bin callforge

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cport=$(free_port)
printf '[store]\npath = "%s/callforge.db"\n' "$work" > "$work/callforge.toml"
"$bin" serve --config "$work/callforge.toml" --http "127.0.0.1:$cport" --scripts scripts >/dev/null 2>"$work/callforge.log" &
cpid=$!
pids+=("$cpid")
python3 -c 'import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], "rb"))))' \
  scripts/routing.toml > "$work/vars.json"
start_peer() { # MODE -> sets ipid, iport
  MODE=$1 node --no-node-snapshot "$bench/server.js" scripts/routing.js "$work/vars.json" 0 \
    >"$work/ivm-$1.out" 2>"$work/ivm-$1.err" &
  ipid=$!
  pids+=("$ipid")
  for _ in $(seq 100); do grep -q '^listening' "$work/ivm-$1.out" && break; sleep 0.05; done
  iport=$(sed -n 's/^listening //p' "$work/ivm-$1.out")
  [ -n "$iport" ] || { echo "isolated-vm server did not start:"; cat "$work/ivm-$1.err"; exit 1; }
}
start_peer isolate; ivm_pid=$ipid; ivm_port=$iport
start_peer context; ctx_pid=$ipid; ctx_port=$iport
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$cport/healthz" >/dev/null && break; sleep 0.05; done

declare -A url pidof
url[callforge]="http://127.0.0.1:$cport/v1/run/routing?mode=class4"; pidof[callforge]=$cpid
url[isolated-vm]="http://127.0.0.1:$ivm_port/"; pidof[isolated-vm]=$ivm_pid
url[isolated-vm-context]="http://127.0.0.1:$ctx_port/"; pidof[isolated-vm-context]=$ctx_pid
rows=(isolated-vm callforge isolated-vm-context)

# The same decision from each: the carriers in the same order with the same headers, and
# every CLI drawn from routing.toml's pool (it is random per run, so compared by membership).
for row in "${rows[@]}"; do
  curl -sf -X POST -H 'Content-Type: application/json' --data-binary @tests/data/five_carriers.json \
    "${url[$row]}" > "$work/answer-$row.json"
done
python3 - "$work/vars.json" "${rows[@]/#/$work/answer-}" <<'PY'
import json, sys
pool = json.load(open(sys.argv[1]))["cli"]["pool"]
def decision(path):
    routing = json.load(open(path + ".json"))["result"]["routing"]
    out = []
    for e in routing["egress_routing"]:
        for gw, v in e["gw"].items():
            assert v["cli"] in pool, f"{path}: cli {v['cli']} not from the pool"
        out.append((list(e["gw"]), e["cost"], e["headers"]))
    return routing["dest_number"], out
answers = {p.rsplit("answer-", 1)[1]: decision(p) for p in sys.argv[2:]}
first = next(iter(answers.values()))
for name, a in answers.items():
    print(f"{name:20} {a[0]} -> {' > '.join(g[0][0] for g in a[1])}")
    assert a == first, f"{name} decides differently: {a} vs {first}"
print("all rows return the same routing decision\n")
PY

lua="$work/post.lua"
. tests/load/wrk_class4.sh
wrk_class4_lua "$lua"
declare -A runs
for r in $(seq "$rounds"); do
  for row in "${rows[@]}"; do
    p=${pidof[$row]}
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$p/stat")
    line=$(wrk -t2 -c"$conns" -d"${secs}s" -s "$lua" "${url[$row]}" | grep '^runs/s')
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$p/stat")
    # Only answered runs count: a 5xx or a timeout is not a run done.
    n=$(awk -v secs="$secs" '{ok = $2 - $6 / secs; print (ok > 0 ? int(ok + 0.5) : 0)}' <<<"$line")
    bad=$(awk '{print $4 + $6}' <<<"$line")
    cpu=$(( (u1 - u0 + s1 - s0) * 1000000 / $(getconf CLK_TCK) ))
    printf 'round %d %-20s %s  server CPU %d us per run\n' "$r" "$row" "$line" $(( cpu / (n * secs > 0 ? n * secs : 1) ))
    [ "$bad" = 0 ] || echo "  ^ $bad errors or non-2xx answers: counted $n good runs/s" >&2
    runs[$row]="${runs[$row]:-} $n"
  done
done

python3 - "$secs" "$conns" "${runs[isolated-vm]}" "${runs[callforge]}" "${runs[isolated-vm-context]}" <<'PY'
import statistics, sys
secs, conns, i, c, x = sys.argv[1:]
i, c, x = ([int(v) for v in s.split()] for s in (i, c, x))
mi, mc, mx = statistics.median(i), statistics.median(c), statistics.median(x)
print(f"\nmedians, {secs} s per round, {conns} connections, wrk -t2:")
print(f"  isolated-vm, new isolate per run:   {mi:.0f} runs/s  {i}")
print(f"  callforge, fresh context per run:   {mc:.0f} runs/s  {c}")
print(f"  isolated-vm, new context per run:   {mx:.0f} runs/s  {x}")
print(f"ratio callforge / isolated-vm (new isolate): {mc / mi:.1f}x  (goal: >= 20x)")
print(f"ratio callforge / isolated-vm (new context): {mc / mx:.1f}x")
PY

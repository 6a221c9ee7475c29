#!/usr/bin/env bash
# Installs what building and testing callforge needs on a Debian machine, when missing:
# a Rust toolchain, a C compiler (QuickJS is C), and the real peers the tests drive.
# Usage: tools/ensure-deps.sh [--test [--bench]]   (or --bench alone)
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
if [ "${1:-}" = "--test" ]; then
  command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
  command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
  command -v sox >/dev/null 2>&1 || missing+=(sox)
  # The prompt tests make an MP3 with sox: without its MP3 handler that case goes untested.
  dpkg -s libsox-fmt-mp3 >/dev/null 2>&1 || missing+=(libsox-fmt-mp3)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # A real record-routing proxy for the Record-Route tests (tests/sip_kamailio.rs).
  command -v kamailio >/dev/null 2>&1 || missing+=(kamailio)
  # A real softphone for the RTP continuity test (tests/softphone_baresip.rs).
  command -v baresip >/dev/null 2>&1 || missing+=(baresip)
  # Kamailio (above) also runs the dispatcher of the cluster test (tests/cluster.rs).
  # The PostgreSQL store tests: initdb/pg_ctl on PATH, or Debian's /usr/lib/postgresql/N/bin.
  if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    missing+=(postgresql)
  fi
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
fi
# The side-by-side benchmarks (tests/load/compare_*.sh; not part of the test suite): wrk, and
# node with the headers node-gyp needs to build isolated-vm without downloading them
# (Debian's libnode-dev matches Debian's nodejs; NodeSource's nodejs ships its own).
if [ "${1:-}" = "--bench" ] || [ "${2:-}" = "--bench" ]; then
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v node >/dev/null 2>&1 || missing+=(nodejs npm libnode-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing the Rust toolchain with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

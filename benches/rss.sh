#!/usr/bin/env bash
# RSS of `serve` with N accounts resident (issue 10's memory bar): starts a
# server on an empty SQLite store, primes N accounts over gRPC with
# `loadgen --prime` (one deduction each), waits for the flush, and prints
# the server's VmRSS.
#
#   benches/rss.sh [BIN] [ACCOUNTS]   # default target/release/packmeter, 1000000
#   PORT=51471 (gRPC; the admin port is PORT + 1000)
set -euo pipefail
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-1000000}
PORT=${PORT:-51471}
work=$(mktemp -d)
spid=
cleanup() {
  [ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$BIN" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + 1000))" \
  --store "sqlite://$work/rss.db" --log-format json >"$work/out" 2>"$work/err" &
spid=$!
for _ in $(seq 100); do
  grep -q listening "$work/out" 2>/dev/null && break
  kill -0 "$spid" 2>/dev/null || { cat "$work/err" "$work/out" >&2; exit 1; }
  sleep 0.1
done
rss() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$spid/status"; }
empty=$(rss)
"$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s 2>&1 | grep -i primed || true
primed=$(rss)
# The flusher writes the primed accounts within its interval.
sleep 5
flushed=$(rss)
echo "rss accounts=$ACCOUNTS empty=${empty}MB primed=${primed}MB after_flush=${flushed}MB"

#!/usr/bin/env bash
# RSS of `serve` with N accounts resident (issue 10's memory bar): starts a
# server on an empty SQLite store, primes N accounts over gRPC with
# `loadgen --prime` (one deduction each, then an Admin.Flush), waits until
# the server is idle (`settle` in benches/lib.sh), and prints the server's
# VmRSS, then again after IDLE seconds (5) idle. The server runs on CPU 0.
#
#   benches/rss.sh [BIN] [ACCOUNTS]   # default target/release/packmeter, 1000000
#   PORT=51471 (gRPC; the admin port is PORT + 1000)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-1000000}
PORT=${PORT:-51471}
serve_one rss "$BIN" "$PORT" "$((PORT + 1000))"
rss() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$spid/status"; }
empty=$(rss)
"$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s 2>&1 | grep -i primed || true
primed=$(rss)
# The prime ended with a flush; let whatever it left running finish.
settle "$spid"
flushed=$(rss)
# And once it has idled for IDLE seconds (default 5): mimalloc gives back
# what it freed after its purge delay (1 s), from serve's upkeep thread
# every 2 s (src/main.rs), so this is the RSS an idle server keeps.
sleep "${IDLE:-5}"
idle=$(rss)
echo "rss accounts=$ACCOUNTS empty=${empty}MB primed=${primed}MB after_flush=${flushed}MB idle=${idle}MB"

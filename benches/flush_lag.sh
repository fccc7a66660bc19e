#!/usr/bin/env bash
# How far the flush falls behind while calls saturate the server's core
# (flush mode's durability window; BENCHMARKS.md, stop 29): starts `serve`
# on an empty SQLite file, primes ACCOUNTS accounts, waits until the
# server is idle, then runs DURATION seconds of Envoy `ShouldRateLimit` at
# 32 in flight and reads `/metrics` every 2 s:
# `packmeter_oldest_unflushed_seconds` (the usage a SIGKILL would lose
# now) and `packmeter_dirty_accounts`. Ends with loadgen's line, the
# flush batches the server wrote in all (the prime's included), and how
# many of them ran at the calls' priority because the flush had fallen
# behind (`packmeter_flush_late_batches_total`; empty for a build before it).
#
#   benches/flush_lag.sh [BIN] [ACCOUNTS] [DURATION]
#   # defaults: target/release/packmeter, 100000, 20 (seconds)
#   PORT=51481 (gRPC; the admin port is PORT + 1000)
#
# The server runs on CPU 0 and loadgen on CPU 1, as in the other scripts.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-100000}
DURATION=${3:-20}
PORT=${PORT:-51481}
ADMIN=$((PORT + 1000))
serve_one lag "$BIN" "$PORT" "$ADMIN"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s >/dev/null 2>&1
settle "$spid"
metric() { awk -v m="$1" '$1 == m { print $2 }' "$work/metrics"; }
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --rpc rls --concurrency 32 \
  --connections 2 --duration "${DURATION}s" --warmup 0s --accounts "$ACCOUNTS" \
  --server-pid "$spid" >"$work/loadgen" 2>&1 &
lpid=$!
for t in $(seq 2 2 "$DURATION"); do
  sleep 2
  curl -fsS "http://127.0.0.1:$ADMIN/metrics" >"$work/metrics"
  echo "t=${t}s oldest_unflushed=$(metric packmeter_oldest_unflushed_seconds)s" \
    "dirty_accounts=$(metric packmeter_dirty_accounts)"
done
wait "$lpid"
tail -1 "$work/loadgen"
curl -fsS "http://127.0.0.1:$ADMIN/metrics" >"$work/metrics"
echo "flush batches=$(metric packmeter_flush_batch_accounts_count)" \
  "accounts flushed=$(metric packmeter_flush_batch_accounts_sum) (prime included)" \
  "late batches=$(metric packmeter_flush_late_batches_total)"

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
# Then what the window cost the disk: the bytes the server wrote (from
# /proc/PID/io) per account flushed in the window, each thread's CPU in
# the window (by thread name, from /proc/PID/task: the tokio workers, the
# flush and SQLite threads at low priority and at the calls' priority), in
# ms and per flushed account, and the server's peak and current RSS. Last, it sends SIGTERM
# and times the shutdown, whose final flush writes what is still dirty.
#
#   benches/flush_lag.sh [BIN] [ACCOUNTS] [DURATION] [serve flags...]
#   # defaults: target/release/packmeter, 100000, 20 (seconds)
#   benches/flush_lag.sh target/release/packmeter 1000000 20 --flush-max-lag off
#   PORT=51481 (gRPC; the admin port is PORT + 1000), RPC=rls (loadgen --rpc)
#
# The server runs on CPU 0 and loadgen on CPU 1, as in the other scripts.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-100000}
DURATION=${3:-20}
shift $(($# < 3 ? $# : 3))
PORT=${PORT:-51481}
ADMIN=$((PORT + 1000))
serve_one lag "$BIN" "$PORT" "$ADMIN" --shutdown-grace 120s "$@"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s >/dev/null 2>&1
settle "$spid"
metric() { awk -v m="$1" '$1 == m { print $2 }' "$work/metrics"; }
written() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$spid/io"; }
# CPU ticks (user + system) per thread name, one "name ticks" line each.
threads() {
  for t in /proc/"$spid"/task/*; do
    printf '%s %s\n' "$(tr ' ' _ <"$t/comm")" "$(cut -d' ' -f14,15 "$t/stat" | awk '{ print $1 + $2 }')"
  done 2>/dev/null | awk '{ s[$1] += $2 } END { for (n in s) print n, s[n] }' | sort
}
curl -fsS "http://127.0.0.1:$ADMIN/metrics" >"$work/metrics"
flushed0=$(metric packmeter_flush_batch_accounts_sum)
written0=$(written)
threads >"$work/threads0"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --rpc "${RPC:-rls}" --concurrency 32 \
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
awk -v a0="$flushed0" -v a1="$(metric packmeter_flush_batch_accounts_sum)" \
  -v w0="$written0" -v w1="$(written)" 'BEGIN {
    n = a1 - a0
    printf "in the window: accounts flushed=%d bytes written=%.0f MB per flushed account=%.0f B\n",
      n, (w1 - w0) / 1e6, (n > 0 ? (w1 - w0) / n : 0) }'
threads >"$work/threads1"
# Per thread name: its CPU in the window, in ms and in µs per flushed account.
join -a 2 -e 0 -o 0,1.2,2.2 "$work/threads0" "$work/threads1" |
  awk -v n="$(metric packmeter_flush_batch_accounts_sum)" -v n0="$flushed0" -v hz="$(getconf CLK_TCK)" '{
    ms = ($3 - $2) * 1000 / hz
    if (ms > 0) printf "thread %s: %.0f ms, %.2f us per flushed account\n", $1, ms, (n > n0 ? ms * 1000 / (n - n0) : 0) }'
echo "peak RSS of the run: $(awk '$1 == "VmHWM:" { printf "%.0f MB", $2 / 1024 }' "/proc/$spid/status")," \
  "RSS now: $(awk '$1 == "VmRSS:" { printf "%.0f MB", $2 / 1024 }' "/proc/$spid/status")"
dirty=$(metric packmeter_dirty_accounts)
started=$(date +%s.%N)
kill -TERM "$spid"
wait "$spid" || true
spid=
echo "shutdown: dirty accounts at SIGTERM=$dirty seconds=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')"

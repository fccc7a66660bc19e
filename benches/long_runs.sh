#!/usr/bin/env bash
# Which of the server's threads hold the core for long (issue 14; BENCHMARKS.md,
# stop 33): starts `serve` on an empty SQLite file, primes ACCOUNTS
# accounts, runs Envoy `ShouldRateLimit` at 32 in flight, and records 8 s
# of scheduler events in the middle of it with `perf sched record`. Prints
# loadgen's line, then for each packmeter thread (the flush's threads, at
# the low priority and at the calls': `pm-flush-late`, `pm-sqlite-write`)
# its runs on the CPU, their total, how many lasted over 1 ms, and the
# longest. A run over 1 ms on the server's single core is a run that calls
# waited behind (the serving threads themselves are left out).
#
#   benches/long_runs.sh [BIN] [ACCOUNTS] [serve flags...]
#   # defaults: target/release/packmeter, 100000
#   PORT=52010 (gRPC; the admin port is PORT + 1000)
#   MIMALLOC_ALLOW_THP=0 benches/long_runs.sh   # without huge pages
#
# Needs `perf` (Debian's linux-perf) and the permission to trace the
# scheduler (root, or kernel.perf_event_paranoid <= 1). `perf sched
# timehist -g -i …` on the recording shows where each long run ended.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-100000}
shift $(($# < 2 ? $# : 2))
PORT=${PORT:-52010}
ADMIN=$((PORT + 1000))
serve_one runs "$BIN" "$PORT" "$ADMIN" "$@"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s >/dev/null 2>&1
settle "$spid"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --rpc rls --concurrency 32 \
  --connections 2 --duration 12s --warmup 1s --accounts "$ACCOUNTS" >"$work/loadgen" 2>&1 &
lpid=$!
sleep 2
perf sched record -o "$work/sched.data" -- sleep 8 >/dev/null 2>&1
wait "$lpid"
tail -1 "$work/loadgen"
perf sched timehist -i "$work/sched.data" 2>/dev/null | awk -v pid="$spid" '
  $3 ~ ("/" pid "]$") && $3 ~ /^(packmeter-|pm-)/ {
    split($3, a, "["); name = a[1]; r = $6
    n[name]++; t[name] += r; if (r > 1) big[name]++; if (r > max[name]) max[name] = r
  }
  END { for (k in n) printf "  %-16s runs=%d total=%.0f ms over_1ms=%d longest=%.2f ms\n", k, n[k], t[k], big[k], max[k] }' | sort

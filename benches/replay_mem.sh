#!/usr/bin/env bash
# What a journal-mode node needs to start after a crash (BENCHMARKS.md,
# stop 33): starts `serve --durability journal` on an empty SQLite file,
# primes ACCOUNTS accounts with `loadgen --prime`, and SIGKILLs the server
# KILL_AFTER seconds into the prime, so the journal holds deductions the
# store lacks. Then it starts a second server on the same file and journal
# and reports how long it took to listen (the journal's and the spill
# file's replay run before that), its peak RSS at that moment (VmHWM), and
# the journal's size before the restart.
#
#   benches/replay_mem.sh [BIN] [ACCOUNTS] [KILL_AFTER] [serve flags...]
#   # defaults: target/release/packmeter, 1000000, 10 (seconds)
#   PORT=51491 (gRPC; the admin port is PORT + 1000)
#
# The server runs on CPU 0 and loadgen on CPU 1, as in the other scripts.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${1:-target/release/packmeter}
ACCOUNTS=${2:-1000000}
KILL_AFTER=${3:-10}
shift $(($# < 3 ? $# : 3))
PORT=${PORT:-51491}
ADMIN=$((PORT + 1000))
serve_one replay "$BIN" "$PORT" "$ADMIN" --durability journal "$@"
taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$PORT" --prime --accounts "$ACCOUNTS" \
  --duration 0s >"$work/prime" 2>&1 &
lpid=$!
sleep "$KILL_AFTER"
kill -KILL "$spid"
wait "$spid" 2>/dev/null || true
kill "$lpid" 2>/dev/null || true
wait "$lpid" 2>/dev/null || true
echo "prime: $(tail -c 300 "$work/prime" | tr "\n" " ")"
echo "journal at the kill: $(du -sb "$work/replay.db.journal" | cut -f1) bytes in" \
  "$(find "$work/replay.db.journal" -type f | wc -l) files"
started=$(date +%s.%N)
taskset -c 0 "$BIN" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
  --store "sqlite://$work/replay.db" --log-format json --durability journal "$@" \
  >"$work/replay.out" 2>"$work/replay.err" &
spid=$!
# TRACE=1: the server's RSS every 0.1 s until it listens, for seeing
# which phase of the start peaks (the replay's log lines carry times).
until grep -q listening "$work/replay.out" 2>/dev/null; do
  kill -0 "$spid" 2>/dev/null || { cat "$work/replay.err" >&2; exit 1; }
  [ -n "${TRACE:-}" ] && echo "t=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')" \
    "rss=$(awk '$1 == "VmRSS:" { printf "%.0f", $2 / 1024 }' "/proc/$spid/status") MiB" \
    "cpu=$(awk '{ print $14 + $15 }' "/proc/$spid/stat") ticks"
  sleep 0.1
done
echo "ready after: $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s," \
  "peak RSS: $(awk '$1 == "VmHWM:" { printf "%.0f MiB", $2 / 1024 }' "/proc/$spid/status")"
grep -o '"message":"journal replayed"[^}]*}\|"deductions":[0-9]*,"batches":[0-9]*' "$work/replay.out" "$work/replay.err" | head -2 || true

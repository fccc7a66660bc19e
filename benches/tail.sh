#!/usr/bin/env bash
# The serving tail while the flush runs (issue 14): Envoy `ShouldRateLimit`
# against packmeter with its default 1 s flush, in flush and journal
# durability, beside the `serve --noop` baseline, in alternated rounds.
#
#   cargo build --release
#   benches/tail.sh > tail.txt
#   OLD=../old/target/release/packmeter benches/tail.sh   # before and after
#
# Servers are pinned to CPU 0 and loadgen to CPU 1; all run at once, idle
# unless measured: before each window the script waits until no server
# uses CPU (a flush left over from the previous window would otherwise
# run on CPU 0 during the next one). Each round runs every scenario against every server back
# to back, so each ratio compares runs a few seconds apart. Scenarios:
#   rls/10000    10 k accounts: each 1 s flush writes the ~10 k accounts
#                touched in that second
#   rls/100000   100 k accounts: each flush writes 50-65 k dirty accounts
#                (the meter also asks for a flush once 50 k are dirty), so a
#                flush of that size runs during most of the window
# Settings (environment): NEW (target/release/packmeter), OLD (unset: no
# old build), ROUNDS (5), DURATION (8s), WARMUP (2s), CONCURRENCY (32),
# CONNECTIONS (2), SCENARIOS ("10000 100000").
# One line per run: round, server, scenario, then loadgen's line; a journal
# server's line ends with its group commits in the window (fsyncs=, from
# packmeter_journal_group_commit_records: records_per_fsync=).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NEW=${NEW:-target/release/packmeter}
OLD=${OLD:-}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-32}
CONNECTIONS=${CONNECTIONS:-2}
SCENARIOS=${SCENARIOS:-"10000 100000"}
work=$(mktemp -d)
declare -A PID PORT ADMIN LAST_SUM LAST_COUNT
servers=()

cleanup() {
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME BIN GRPC_PORT ADMIN_PORT [serve flags...]
start() {
  local name=$1
  START_TRIES=300 start_server "$@"
  PID[$name]=$SERVED
  PORT[$name]=$3
  ADMIN[$name]=$4
  servers+=("$name")
}

# groups NAME: sets COMMITS to a journal server's group commits since the
# last call, as " fsyncs=N records_per_fsync=R" (empty for other servers).
groups() {
  local name=$1 m sum count
  COMMITS=""
  case "$name" in *journal) ;; *) return 0 ;; esac
  m=$(curl -s "http://127.0.0.1:${ADMIN[$name]}/metrics")
  sum=$(awk '$1 == "packmeter_journal_group_commit_records_sum" { print $2 }' <<<"$m")
  count=$(awk '$1 == "packmeter_journal_group_commit_records_count" { print $2 }' <<<"$m")
  COMMITS=$(awk -v s="${sum:-0}" -v c="${count:-0}" -v ls="${LAST_SUM[$name]:-0}" -v lc="${LAST_COUNT[$name]:-0}" \
    'BEGIN { if (c > lc) printf " fsyncs=%d records_per_fsync=%.1f", c - lc, (s - ls) / (c - lc) }')
  LAST_SUM[$name]=${sum:-0}
  LAST_COUNT[$name]=${count:-0}
}

start noop "$NEW" 51201 52201 --noop
start new "$NEW" 51202 52202
start new-journal "$NEW" 51203 52203 --durability journal
if [ -n "$OLD" ]; then
  start old "$OLD" 51204 52204
  start old-journal "$OLD" 51205 52205 --durability journal
fi

echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; rounds=$ROUNDS duration=$DURATION warmup=$WARMUP concurrency=$CONCURRENCY connections=$CONNECTIONS; load $(cut -d' ' -f1-3 /proc/loadavg)"
for n in $SCENARIOS; do
  for name in "${servers[@]}"; do
    [ "$name" = noop ] && continue
    # Every account resident and flushed before the first round.
    taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$name]}" --accounts "$n" \
      --prime --duration 0s --warmup 0s >/dev/null 2>&1
  done
  for name in "${servers[@]}"; do groups "$name"; done
  for round in $(seq "$ROUNDS"); do
    for name in "${servers[@]}"; do
      settle "${PID[@]}"
      line=$(taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$name]}" \
        --server-pid "${PID[$name]}" --rpc rls --accounts "$n" --duration "$DURATION" \
        --warmup "$WARMUP" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
        2>>"$work/loadgen.err")
      groups "$name"
      echo "round=$round server=$name scenario=rls/$n $line$COMMITS"
    done
  done
done
grep -h '"level":"WARN"\|"level":"ERROR"' "$work"/*.err | head -5 >&2 || true

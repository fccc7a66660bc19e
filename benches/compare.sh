#!/usr/bin/env bash
# Two builds of packmeter side by side, beside the `serve --noop` baseline,
# in one run: each scenario runs against noop, OLD and NEW back to back,
# round by round. Loopback windows move by 5-10% from one minute to the
# next on a shared 2-core VM; alternating the builds is what separates a
# change from that spread.
#
#   git worktree add ../old <commit> && (cd ../old && cargo build --release)
#   cargo build --release
#   OLD=../old/target/release/packmeter benches/compare.sh
#   OLD=... RPCS=batch ROUNDS=3 benches/compare.sh
#
# Servers are pinned to CPU 0 and loadgen to CPU 1 (benches/lib.sh); before
# each window the script waits until every server is idle, so a flush left
# from the last window does not run in the next. Settings (environment):
# OLD, NEW (target/release/packmeter), RPCS ("deduct rls batch stream"),
# ROUNDS (3), DURATION (8s), WARMUP (2s), ACCOUNTS (10000), BATCH (100),
# CONCURRENCY (32), CONNECTIONS (2). Prints one line per run: rpc, round,
# server, then loadgen's JSON line.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NEW=${NEW:-target/release/packmeter}
OLD=${OLD:?set OLD to the other build}
RPCS=${RPCS:-"deduct rls batch stream"}
ROUNDS=${ROUNDS:-3}
ACCOUNTS=${ACCOUNTS:-10000}
work=$(mktemp -d)
declare -A PID PORT
cleanup() {
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
i=0
for s in "noop:$NEW:--noop" "old:$OLD:" "new:$NEW:"; do
  IFS=: read -r name bin flag <<<"$s"
  port=$((51101 + i))
  i=$((i + 1))
  # shellcheck disable=SC2086 # the flag is one word or none
  start_server "$name" "$bin" "$port" $((port + 1000)) $flag
  PID[$name]=$SERVED
  PORT[$name]=$port
done
for name in old new; do
  taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$name]}" --accounts "$ACCOUNTS" \
    --prime --duration 1s --warmup 0s >/dev/null 2>&1
done
for rpc in $RPCS; do
  for round in $(seq "$ROUNDS"); do
    for name in noop old new; do
      settle "${PID[@]}"
      line=$(taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$name]}" --rpc "$rpc" \
        --batch "${BATCH:-100}" --concurrency "${CONCURRENCY:-32}" \
        --connections "${CONNECTIONS:-2}" --duration "${DURATION:-8s}" --warmup "${WARMUP:-2s}" \
        --accounts "$ACCOUNTS" --server-pid "${PID[$name]}" --json 2>/dev/null | tail -1)
      echo "$rpc $round $name $line"
    done
  done
done

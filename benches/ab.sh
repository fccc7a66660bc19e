#!/usr/bin/env bash
# Two builds side by side, beside the no-op: one RPC at 10 k accounts (the
# default 1 s flush), rounds of no-op, old, new back to back, each window
# after every server is idle (benches/lib.sh). Loopback windows move by
# 5-10% from one minute to the next on a shared 2-core VM; alternating the
# builds round by round is what separates a change from that spread.
#
#   OLD=/tmp/old/packmeter NEW=target/release/packmeter RPC=batch benches/ab.sh
#
# Settings (environment): OLD (required), NEW (target/release/packmeter),
# RPC (deduct|batch|stream|rls, default batch), ROUNDS (3), ACCOUNTS (10000),
# BATCH (100), DURATION (8s), WARMUP (2s), CONCURRENCY (32), CONNECTIONS (2).
# One line per window: round, server, then loadgen's line.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NEW=${NEW:-target/release/packmeter}
OLD=${OLD:?set OLD to the build to compare against}
RPC=${RPC:-batch}
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
  port=$((53100 + i))
  i=$((i + 1))
  # shellcheck disable=SC2086 # the flag is one word or none
  start_server "$name" "$bin" "$port" $((port + 100)) $flag
  PID[$name]=$SERVED
  PORT[$name]=$port
done
for n in old new; do
  taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$n]}" --accounts "$ACCOUNTS" \
    --prime --duration 1s --warmup 0s >/dev/null 2>&1
done
for r in $(seq "$ROUNDS"); do
  for n in noop old new; do
    settle "${PID[@]}"
    line=$(taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$n]}" --rpc "$RPC" \
      --batch "${BATCH:-100}" --accounts "$ACCOUNTS" --concurrency "${CONCURRENCY:-32}" \
      --connections "${CONNECTIONS:-2}" --duration "${DURATION:-8s}" --warmup "${WARMUP:-2s}" \
      --server-pid "${PID[$n]}" 2>/dev/null | tail -1)
    echo "round=$r server=$n $line"
  done
done

#!/usr/bin/env bash
# The first pass over 1 M new accounts (issue 10): Envoy `ShouldRateLimit`
# (or RPC) with accounts drawn uniformly among 1 M, against a server whose
# store is empty, beside the `serve --noop` baseline in the same run.
#
#   cargo build --release
#   benches/first_pass.sh > first_pass.txt
#
# Each round starts a fresh server on an empty SQLite file, so every
# account is new to it when first drawn. With 2 s of warm-up and 8 s
# measured, the share of calls that find their account new depends on the
# rate: about 84% at 30 k calls/s, 63% at 80 k calls/s (expected distinct
# draws, 1 - e^(-calls/1M)); read the ratio with that in mind.
# Servers are pinned to CPU 0, loadgen to CPU 1. Settings (environment):
# BIN (target/release/packmeter), ROUNDS (2), RPC (rls), ACCOUNTS (1000000),
# EXTRA (flags for the real server), PERF (set: perf record the first
# round's real server into first.data).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release/packmeter}
ROUNDS=${ROUNDS:-2}
RPC=${RPC:-rls}
ACCOUNTS=${ACCOUNTS:-1000000}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME GRPC_PORT ADMIN_PORT [serve flags...]; sets SPID
start() {
  local name=$1
  shift
  start_server "$name" "$BIN" "$@"
  SPID=$SERVED
  pids+=("$SPID")
}

# load PORT PID [loadgen flags...]
load() {
  local port=$1 pid=$2
  shift 2
  taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:$port" --server-pid "$pid" \
    --concurrency 32 --connections 2 --warmup 2s --duration 8s "$@" 2>/dev/null | tail -1
}

start noop 51301 52301 --noop
noop=$SPID
echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; rpc=$RPC accounts=$ACCOUNTS; load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  start "real$r" 51302 52302 ${EXTRA:-}
  real=$SPID
  echo "round=$r server=noop $(load 51301 "$noop" --rpc "$RPC" --accounts "$ACCOUNTS" --seed "$r")"
  if [ -n "${PERF:-}" ] && [ "$r" = 1 ]; then
    (sleep 3 && perf record -F 999 -g -p "$real" -o first.data -- sleep 4 >/dev/null 2>&1) &
  fi
  echo "round=$r server=real $(load 51302 "$real" --rpc "$RPC" --accounts "$ACCOUNTS" --seed "$r")"
  kill -TERM "$real"
  wait "$real" || true
done

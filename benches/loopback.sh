#!/usr/bin/env bash
# Loopback gRPC benchmarks: `packmeter loadgen` against `serve` and against
# the `serve --noop` baseline, side by side in one run (see BENCHMARKS.md).
#
#   cargo build --release
#   benches/loopback.sh > loopback.txt
#
# The servers are pinned to CPU 0 and loadgen to CPU 1 (taskset), so each
# has one core of a 2-core machine. Three servers run at once, idle when not
# measured:
#   noop     serve --noop                        fixed answers, no metering
#   real     serve                               flushes every 1s (the default)
#   noflush  serve --flush-interval 1h           no flush in the window (10 k accounts)
# Each scenario runs against the servers back to back, so the pair shares
# the machine's state; before each window the script waits until no server
# uses CPU (benches/lib.sh), so a flush left from the last window does not
# run in the next one. Settings (environment): BIN, DURATION (8s), WARMUP
# (2s), CONCURRENCY (32), CONNECTIONS (2), BIG (1000000 accounts;
# empty: the 10 k scenarios alone).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BIN=${BIN:-target/release/packmeter}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-32}
CONNECTIONS=${CONNECTIONS:-2}
BIG=${BIG-1000000}
work=$(mktemp -d)
declare -A PID PORT
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME GRPC_PORT ADMIN_PORT [serve flags...]
start() {
  local name=$1
  shift
  start_server "$name" "$BIN" "$@"
  PID[$name]=$SERVED
  PORT[$name]=$1
  pids+=("$SERVED")
}

# load NAME LABEL [loadgen flags...]
load() {
  local name=$1 label=$2
  shift 2
  local line
  settle "${pids[@]}"
  line=$(taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:${PORT[$name]}" \
    --server-pid "${PID[$name]}" --duration "$DURATION" --warmup "$WARMUP" \
    --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" "$@" 2>>"$work/loadgen.err")
  echo "server=$name scenario=$label $line"
}

# prime NAME ACCOUNTS: every account resident and flushed before measuring.
prime() {
  taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:${PORT[$1]}" --accounts "$2" \
    --prime --duration 0s --warmup 0s 2>&1 | sed "s/^/# $1: /"
}

start noop 50561 9561 --noop
start real 50562 9562
start noflush 50563 9563 --flush-interval 1h

echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; duration=$DURATION warmup=$WARMUP concurrency=$CONCURRENCY connections=$CONNECTIONS"
# shellcheck disable=SC2086 # BIG may be empty
for n in 10000 $BIG; do
  prime real "$n"
  [ "$n" = 10000 ] && prime noflush "$n"
  for rpc in deduct rls; do
    load noop "$rpc/$n" --rpc "$rpc" --accounts "$n"
    load real "$rpc/$n" --rpc "$rpc" --accounts "$n"
    [ "$n" = 10000 ] && [ "$rpc" = deduct ] && load noflush "$rpc/$n" --rpc "$rpc" --accounts "$n"
  done
  if [ "$n" = 10000 ]; then
    for rpc in batch stream; do
      load noop "$rpc/$n" --rpc "$rpc" --accounts "$n" --batch 100
      load real "$rpc/$n" --rpc "$rpc" --accounts "$n" --batch 100
    done
  fi
done
grep -h '"level":"WARN"\|"level":"ERROR"' "$work"/*.err | head -5 >&2 || true

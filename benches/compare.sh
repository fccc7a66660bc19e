#!/usr/bin/env bash
# Two builds of packmeter side by side, beside the `serve --noop` baseline,
# in one run: each scenario runs against noop, OLD and NEW back to back.
#
#   git worktree add ../old <commit> && (cd ../old && cargo build --release)
#   cargo build --release
#   OLD=../old/target/release/packmeter benches/compare.sh
#
# Servers are pinned to CPU 0 and loadgen to CPU 1. Settings (environment):
# OLD, NEW (target/release/packmeter), DURATION (8s), ACCOUNTS (10000),
# ROUNDS (2). Prints one JSON line per run, prefixed with rpc, round, server.
set -euo pipefail
NEW=${NEW:-target/release/packmeter}
OLD=${OLD:?set OLD to the other build}
DURATION=${DURATION:-8s}
ACCOUNTS=${ACCOUNTS:-10000}
ROUNDS=${ROUNDS:-2}
work=$(mktemp -d)
declare -A PID PORT
cleanup() {
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
start() { # name bin port admin [flags...]
  local name=$1 bin=$2 port=$3 admin=$4
  shift 4
  taskset -c 0 "$bin" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --store "sqlite://$work/$name.db" --log-format json "$@" >"$work/$name.out" 2>"$work/$name.err" &
  PID[$name]=$!
  PORT[$name]=$port
  for _ in $(seq 100); do
    grep -q listening "$work/$name.out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$name did not start" >&2
  exit 1
}
start noop "$NEW" 51101 52101 --noop
start old "$OLD" 51102 52102
start new "$NEW" 51103 52103
for rpc in deduct rls batch; do
  for round in $(seq "$ROUNDS"); do
    for name in noop old new; do
      prime=()
      [[ $name != noop && $round == 1 && $rpc == deduct ]] && prime=(--prime)
      line=$(taskset -c 1 "$NEW" loadgen --server "http://127.0.0.1:${PORT[$name]}" --rpc "$rpc" \
        --concurrency 32 --connections 2 --duration "$DURATION" --warmup 2s \
        --accounts "$ACCOUNTS" "${prime[@]}" --json 2>/dev/null | tail -1)
      echo "$rpc $round $name $line"
    done
  done
done

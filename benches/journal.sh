#!/usr/bin/env bash
# `--durability journal` against `--durability flush`, beside the
# `serve --noop` baseline, in one run (BENCHMARKS.md, "Durability modes").
#
#   cargo build --release
#   benches/journal.sh > journal.txt
#
# Servers on CPU 0, loadgen on CPU 1 (taskset), as in benches/loopback.sh:
#   noop     serve --noop                       fixed answers, no metering
#   flush    serve --durability flush           flushes every 1s
#   journal  serve --durability journal         flushes every 1s, journal synced per group
# 10 k accounts, primed (resident and flushed) before measuring. After each
# journal scenario the group-commit histogram's mean is printed. Last, the
# replay of REPLAY deductions (default 1000000) left in a journal by a kill -9
# is timed: from the restart to the ports bound (/readyz answers 503) and to
# ready (the listening line).
# Settings (environment): BIN, DURATION (8s), WARMUP (2s), CONCURRENCY (32),
# CONNECTIONS (2), ACCOUNTS (10000), REPLAY (1000000; 0 to skip), ONLY_REPLAY
# (1: the replay measurement alone).
set -euo pipefail

BIN=${BIN:-target/release/packmeter}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-32}
CONNECTIONS=${CONNECTIONS:-2}
ACCOUNTS=${ACCOUNTS:-10000}
REPLAY=${REPLAY:-1000000}
work=$(mktemp -d)
declare -A PID PORT ADMIN
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME GRPC_PORT ADMIN_PORT [serve flags...]
start() {
  local name=$1 port=$2 admin=$3
  shift 3
  taskset -c 0 "$BIN" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --store "sqlite://$work/$name.db" --log-format json "$@" \
    >"$work/$name.out" 2>>"$work/$name.err" &
  PID[$name]=$!
  PORT[$name]=$port
  ADMIN[$name]=$admin
  pids+=("$!")
  for _ in $(seq 6000); do
    grep -q listening "$work/$name.out" 2>/dev/null && return 0
    sleep 0.01
  done
  echo "server $name did not start:" >&2
  cat "$work/$name.err" >&2
  exit 1
}

# load NAME LABEL [loadgen flags...]
load() {
  local name=$1 label=$2
  shift 2
  local line
  line=$(taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:${PORT[$name]}" \
    --server-pid "${PID[$name]}" --duration "$DURATION" --warmup "$WARMUP" \
    --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" "$@" 2>>"$work/loadgen.err")
  echo "server=$name scenario=$label $line"
}

prime() {
  taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:${PORT[$1]}" --accounts "$2" \
    --prime --duration 0s --warmup 0s 2>&1 | sed "s/^/# $1: /"
}

metric() {
  curl -s "http://127.0.0.1:${ADMIN[$1]}/metrics" | awk -v m="$2" '$1 == m { print $2 }'
}

# The journal's group commits since the last call: records per fsync and
# mean fsync time.
declare -A LAST
groups() {
  local sum count fsum fcount
  sum=$(metric journal packmeter_journal_group_commit_records_sum)
  count=$(metric journal packmeter_journal_group_commit_records_count)
  fsum=$(metric journal packmeter_journal_fsync_duration_seconds_sum)
  fcount=$(metric journal packmeter_journal_fsync_duration_seconds_count)
  awk -v s="$sum" -v c="$count" -v fs="$fsum" -v fc="$fcount" \
    -v ls="${LAST[s]:-0}" -v lc="${LAST[c]:-0}" -v lfs="${LAST[fs]:-0}" -v lfc="${LAST[fc]:-0}" -v label="$1" \
    'BEGIN { n = c - lc; if (n > 0) printf "# journal %s: %d group commits, %.1f deduction groups per fsync, fsync mean %.0f us\n", label, n, (s - ls) / n, (fs - lfs) / (fc - lfc) * 1e6 }'
  LAST[s]=$sum LAST[c]=$count LAST[fs]=$fsum LAST[fc]=$fcount
}

if [ "${ONLY_REPLAY:-0}" != 1 ]; then
start noop 50571 9571 --noop
start flush 50572 9572 --durability flush
start journal 50573 9573 --durability journal

echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; duration=$DURATION warmup=$WARMUP concurrency=$CONCURRENCY connections=$CONNECTIONS accounts=$ACCOUNTS; journal on $(df --output=fstype "$work" | tail -1)"
prime flush "$ACCOUNTS"
prime journal "$ACCOUNTS"
groups prime >/dev/null
for rpc in deduct batch stream; do
  extra=()
  [ "$rpc" != deduct ] && extra=(--batch 100)
  load noop "$rpc/$ACCOUNTS" --rpc "$rpc" --accounts "$ACCOUNTS" "${extra[@]}"
  load flush "$rpc/$ACCOUNTS" --rpc "$rpc" --accounts "$ACCOUNTS" "${extra[@]}"
  load journal "$rpc/$ACCOUNTS" --rpc "$rpc" --accounts "$ACCOUNTS" "${extra[@]}"
  groups "$rpc"
done
echo "# journal size at the end: $(metric journal packmeter_journal_bytes) bytes"
fi

if [ "$REPLAY" -gt 0 ]; then
  # A journal of REPLAY deductions that no flush took: flush interval 1h,
  # batches of 100 until REPLAY are acknowledged, then kill -9.
  start replay 50574 9574 --durability journal --flush-interval 1h
  n=0
  while [ "$n" -lt "$REPLAY" ]; do
    out=$(taskset -c 1 "$BIN" loadgen --server "http://127.0.0.1:50574" --rpc batch --batch 100 \
      --accounts "$ACCOUNTS" --duration 5s --warmup 0s --concurrency "$CONCURRENCY" 2>/dev/null)
    ops=$(sed -n 's/.* ops=\([0-9]*\) .*/\1/p' <<<"$out")
    if [ -z "$ops" ]; then
      ops=$(awk -v l="$out" 'BEGIN { if (match(l, /ops\/s=[0-9.]+/)) print int(substr(l, RSTART + 6, RLENGTH - 6) * 5) }')
    fi
    n=$((n + ops * 100))
  done
  bytes=$(du -sb "$work/replay.db.journal" | cut -f1)
  kill -KILL "${PID[replay]}"
  wait "${PID[replay]}" 2>/dev/null || true
  : >"$work/replay.out"
  # The ports are bound before the replay: note when /readyz first answers,
  # and what (503 while replaying).
  (
    until code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:9574/readyz") && [ "$code" != 000 ]; do
      sleep 0.005
    done
    echo "$(date +%s.%N) $code" >"$work/bound"
  ) &
  poller=$!
  t0=$(date +%s.%N)
  start replay 50574 9574 --durability journal --flush-interval 1h
  t1=$(date +%s.%N)
  wait "$poller"
  read -r tb code <"$work/bound"
  echo "# replay: ~$n deductions, journal $bytes bytes, restart to ports bound (/readyz $code) $(awk -v a="$t0" -v b="$tb" 'BEGIN { printf "%.3f", b - a }') s, to ready (listening line) $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
fi
grep -h '"level":"WARN"\|"level":"ERROR"' "$work"/*.err | head -5 >&2 || true

#!/usr/bin/env bash
# Issue 8: three `packmeter serve` nodes on one PostgreSQL database under
# `packmeter loadgen` on shared accounts, against one node alone on SQLite,
# in one run (see BENCHMARKS.md, "Issue 8: three nodes on one PostgreSQL").
#
#   cargo build --release
#   benches/fleet.sh > fleet.txt
#
# Phases, each with the same loadgen settings and account ids:
#   sqlite   one node on its own SQLite file, one loadgen
#   pg1      one node on PostgreSQL, one loadgen (the same node software
#            with the shared store, to separate the store from the fleet)
#   pg3      three nodes on one PostgreSQL database, three loadgens at once,
#            one per node, drawing from the same accounts
# Each phase gets a fresh store and fresh nodes.
#
# Every account is an overage account with a free tier of FREE_CALLS calls,
# small enough that the load exhausts it during the run. Real time, each node
# covers calls from its own view of the packs (global total at its last
# flush plus its own unflushed usage); the flush then caps every pack at its
# capacity and books the rest as overage. The **over-cover** is how many
# calls the nodes answered as covered beyond what the packs held:
#   answered covered (sum of loadgen's calls_covered, whole run)
#   - stored covered (sum of packs.used after the final flush of every node)
# It is also checked that the ledger is exact (stored covered + stored
# overage = answered covered + answered overage) and that no pack's used
# exceeds its capacity; a failed check is printed and the script exits 1.
#
# The machine caveat: on 2 shared cores, the nodes, PostgreSQL and the
# load generators all compete for the same cores (nothing is pinned), so the
# pg3 per-node figure is a third of what one machine does with four
# processes on it, not what three separate machines would do.
#
# Settings (environment): BIN (target/release/packmeter), PG (the server,
# default PACKMETER_TEST_POSTGRES_URL or postgres://postgres@127.0.0.1:5432/postgres),
# ACCOUNTS (1000), FREE_CALLS (100), DURATION (10s), WARMUP (2s),
# CONCURRENCY (16 per loadgen), CONNECTIONS (2), FLUSH_INTERVAL (1s),
# BASE_PORT (57300), PHASES ("sqlite pg1 pg3"). Needs psql and jq.
set -euo pipefail

BIN=${BIN:-target/release/packmeter}
PG=${PG:-${PACKMETER_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
ACCOUNTS=${ACCOUNTS:-1000}
FREE_CALLS=${FREE_CALLS:-100}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-16}
CONNECTIONS=${CONNECTIONS:-2}
FLUSH_INTERVAL=${FLUSH_INTERVAL:-1s}
BASE_PORT=${BASE_PORT:-57300}
PHASES=${PHASES:-sqlite pg1 pg3}

for tool in psql jq "$BIN"; do
  command -v "$tool" >/dev/null || { echo "fleet.sh: needs $tool" >&2; exit 69; }
done

work=$(mktemp -d)
pids=()
dbs=()
# The server URL with another database: postgres://a@h:p/DB[?q] -> .../NAME[?q]
with_db() {
  local url=$1 name=$2 base query=""
  base=${url%%\?*}
  [[ $url == *\?* ]] && query="?${url#*\?}"
  local scheme=${base%%://*} rest=${base#*://}
  echo "$scheme://${rest%%/*}/$name$query"
}

stop_nodes() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

cleanup() {
  stop_nodes
  for d in "${dbs[@]}"; do
    psql "$PG" -qAtc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# node N STORE_URL: starts node N (gRPC on BASE_PORT+N, admin on BASE_PORT+10+N).
node() {
  local n=$1 store=$2
  "$BIN" serve --listen "127.0.0.1:$((BASE_PORT + n))" --admin-listen "127.0.0.1:$((BASE_PORT + 10 + n))" \
    --store "$store" --free-calls "$FREE_CALLS" --flush-interval "$FLUSH_INTERVAL" --log-format json \
    >"$work/node$n.out" 2>"$work/node$n.err" &
  pids+=("$!")
  for _ in $(seq 300); do
    grep -q listening "$work/node$n.out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "node $n did not start:" >&2
  cat "$work/node$n.err" "$work/node$n.out" >&2
  exit 1
}

# load N: one loadgen against node N; prints its JSON line.
load() {
  "$BIN" loadgen --server "http://127.0.0.1:$((BASE_PORT + $1))" --json \
    --duration "$DURATION" --warmup "$WARMUP" --concurrency "$CONCURRENCY" \
    --connections "$CONNECTIONS" --accounts "$ACCOUNTS" --seed "$((0x5EED + $1))" \
    2>>"$work/loadgen.err"
}

flush_all() {
  for n in "$@"; do
    "$BIN" flush --server "http://127.0.0.1:$((BASE_PORT + n))" >/dev/null
  done
}

# report PHASE NODES FILES...: throughput per node, and the answered totals.
report() {
  local phase=$1 nodes=$2
  shift 2
  jq -s --arg phase "$phase" --argjson nodes "$nodes" '{
      phase: $phase, nodes: $nodes,
      ops_per_s_per_node: ((map(.ops_per_s) | add) / $nodes),
      ops_per_s_total: (map(.ops_per_s) | add),
      p50_us: (map(.p50_us) | max), p99_us: (map(.p99_us) | max),
      errors: (map(.errors) | add),
      calls_covered: (map(.calls_covered) | add),
      calls_overage: (map(.calls_overage) | add)
    }' "$@"
}

# ledger PHASE SUMMARY_FILE QUERY_PREFIX: checks the store's sums against
# what was answered, and prints the over-cover.
ledger() {
  local phase=$1 summary=$2
  shift 2
  local covered overage used over_cap
  covered=$(jq .calls_covered "$summary")
  overage=$(jq .calls_overage "$summary")
  read -r used over_cap stored_overage stored_total < <("$@")
  local over_cover=$((covered - used))
  local exact=yes
  [ "$((used + stored_overage))" = "$stored_total" ] || exact=no
  [ "$stored_total" = "$((covered + overage))" ] || exact=no
  [ "$over_cap" = 0 ] || exact=no
  jq -c --arg phase "$phase" --argjson used "$used" --argjson stored_overage "$stored_overage" \
    --argjson stored_total "$stored_total" --argjson over_cap "$over_cap" \
    --argjson over_cover "$over_cover" --arg exact "$exact" --argjson accounts "$ACCOUNTS" \
    --argjson free "$FREE_CALLS" '. + {
      stored_covered: $used, stored_overage: $stored_overage, stored_total: $stored_total,
      packs_over_capacity: $over_cap, exact: $exact,
      over_cover_calls: $over_cover,
      over_cover_per_account: ($over_cover / $accounts),
      over_cover_share_of_capacity: ($over_cover / ($accounts * $free))
    }' "$summary"
  if [ "$exact" != yes ]; then
    echo "fleet.sh: $phase: the stored ledger does not match what was answered" >&2
    status=1
  fi
}

pg_sums() {
  psql "$1" -qAt -F ' ' -c "SELECT
      (SELECT COALESCE(sum(used), 0) FROM packs WHERE item = 1),
      (SELECT count(*) FROM packs WHERE used > capacity),
      (SELECT COALESCE(sum(amount), 0) FROM usage_hourly WHERE item = 1 AND pack_id = ''),
      (SELECT COALESCE(sum(amount), 0) FROM usage_hourly WHERE item = 1)"
}

sqlite_sums() {
  # The SQLite store has the same tables; read them with python's sqlite3.
  python3 - "$1" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
q = lambda s: c.execute(s).fetchone()[0] or 0
print(q("SELECT sum(used) FROM packs WHERE item = 1"),
      q("SELECT count(*) FROM packs WHERE used > capacity"),
      q("SELECT sum(amount) FROM usage_hourly WHERE item = 1 AND pack_id = ''"),
      q("SELECT sum(amount) FROM usage_hourly WHERE item = 1"))
EOF
}

new_db() {
  local name
  name="pm_fleet_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
  psql "$PG" -qAtc "CREATE DATABASE $name" >/dev/null
  dbs+=("$name")
  with_db "$PG" "$name"
}

status=0
echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); accounts=$ACCOUNTS free_calls=$FREE_CALLS duration=$DURATION warmup=$WARMUP concurrency=$CONCURRENCY/loadgen connections=$CONNECTIONS flush_interval=$FLUSH_INTERVAL"
for phase in $PHASES; do
  case $phase in
    sqlite)
      node 1 "sqlite://$work/sqlite.db"
      load 1 >"$work/$phase.1.json"
      flush_all 1
      report "$phase" 1 "$work/$phase.1.json" >"$work/$phase.sum"
      ledger "$phase" "$work/$phase.sum" sqlite_sums "$work/sqlite.db"
      ;;
    pg1)
      url=$(new_db)
      node 1 "$url"
      load 1 >"$work/$phase.1.json"
      flush_all 1
      report "$phase" 1 "$work/$phase.1.json" >"$work/$phase.sum"
      ledger "$phase" "$work/$phase.sum" pg_sums "$url"
      ;;
    pg3)
      url=$(new_db)
      node 1 "$url"
      node 2 "$url"
      node 3 "$url"
      load 1 >"$work/$phase.1.json" &
      l1=$!
      load 2 >"$work/$phase.2.json" &
      l2=$!
      load 3 >"$work/$phase.3.json" &
      l3=$!
      wait "$l1" "$l2" "$l3"
      flush_all 1 2 3
      report "$phase" 3 "$work/$phase".{1,2,3}.json >"$work/$phase.sum"
      ledger "$phase" "$work/$phase.sum" pg_sums "$url"
      ;;
    *)
      echo "fleet.sh: unknown phase $phase" >&2
      exit 64
      ;;
  esac
  stop_nodes
done
if [ -s "$work/loadgen.err" ]; then
  sed 's/^/# loadgen: /' "$work/loadgen.err"
fi
exit "$status"

#!/usr/bin/env bash
# Every bar of issue 10 (and issue 14's bars at 10 k accounts) measured in
# one run, beside the `serve --noop` baseline of the same run, and printed
# as one markdown table (BENCHMARKS.md, *Summary*). About 25 minutes.
#
#   cargo build --release --bin packmeter
#   benches/bars.sh > bars.txt
#
# What it runs, in order (each script's own header says how it measures):
# - benches/loopback.sh, ROUNDS times (3): unary Deduct and ShouldRateLimit
#   at 10 k accounts, DeductBatch and DeductStream (100 per message) at
#   10 k. A ratio is taken within each round, against that round's no-op;
#   the table gives the median and the range of the rounds.
# - ShouldRateLimit at 1 M accounts once warm (after one pass over every
#   account), ROUNDS alternated windows of 10 s after 10 s of warm-up.
# - benches/first_pass.sh (2 rounds): ShouldRateLimit over 1 M new accounts.
# - benches/rss.sh: RSS with 1 M accounts resident, once idle.
# - The restart: a server on a fresh file, 1 M accounts primed, SIGTERM,
#   and a new server on the same file, timed from its start to its
#   listening line (printed once it is ready).
# - The in-process medians (criterion, `serve`'s allocator): deduct/hot and
#   deduct/among_1m of benches/deduct_mimalloc.rs. SKIP_CRITERION=1 skips
#   them (their build takes a few minutes).
# Raw lines go to stderr prefixed by their source; the table to stdout.
# Settings (environment): BIN (target/release/packmeter), ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
BIN=${BIN:-target/release/packmeter}
ROUNDS=${ROUNDS:-3}
raw=$(mktemp -d)
work=$raw
spid=
cleanup() {
  [ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
  rm -rf "$raw"
}
trap cleanup EXIT

header="$(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs, build $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $header" >&2

for r in $(seq "$ROUNDS"); do
  BIN=$BIN BIG='' benches/loopback.sh 2>/dev/null | sed "s/^server=/round=$r server=/" |
    tee -a "$raw/loopback" | sed 's/^/loopback: /' >&2
done

# 1 M accounts, warm: the no-op and a server with 1 M accounts primed (one
# pass over every account, flushed), alternated ROUNDS times. Each window
# has 10 s of warm-up, so that the flush is in its steady state when it is
# measured (it runs at the calls' priority once 3 flush intervals behind);
# loopback.sh's 2 s left the first window after the prime without it.
start_server noop "$BIN" 51497 52497 --noop
noop=$SERVED
start_server warm "$BIN" 51498 52498
warm=$SERVED
taskset -c 1 "$BIN" loadgen --server http://127.0.0.1:51498 --prime --accounts 1000000 \
  --duration 0s >/dev/null 2>&1
for r in $(seq "$ROUNDS"); do
  for s in "noop 51497 $noop" "real 51498 $warm"; do
    set -- $s
    settle "$noop" "$warm"
    echo "round=$r server=$1 scenario=rls/1000000 $(taskset -c 1 "$BIN" loadgen \
      --server "http://127.0.0.1:$2" --server-pid "$3" --rpc rls --accounts 1000000 \
      --warmup 10s --duration 10s --concurrency 32 --connections 2 2>/dev/null | tail -1)"
  done
done | tee -a "$raw/loopback" | sed 's/^/warm 1 M: /' >&2
kill -TERM "$noop" "$warm"
wait "$noop" "$warm" || true
BIN=$BIN ROUNDS=2 benches/first_pass.sh 2>/dev/null | tee "$raw/first_pass" |
  sed 's/^/first_pass: /' >&2
benches/rss.sh "$BIN" 1000000 2>/dev/null | tee "$raw/rss" | sed 's/^/rss: /' >&2

# The restart over 1 M stored accounts.
start_server restart "$BIN" 51495 52495
spid=$SERVED
taskset -c 1 "$BIN" loadgen --server http://127.0.0.1:51495 --prime --accounts 1000000 \
  --duration 0s >/dev/null 2>&1
kill -TERM "$spid"
wait "$spid" || true
t0=$(date +%s.%N)
taskset -c 0 "$BIN" serve --listen 127.0.0.1:51495 --admin-listen 127.0.0.1:52495 \
  --store "sqlite://$raw/restart.db" >"$raw/restart.out" 2>"$raw/restart.err" &
spid=$!
until grep -q listening "$raw/restart.out" 2>/dev/null; do
  kill -0 "$spid" 2>/dev/null || { cat "$raw/restart.err" >&2; exit 1; }
  sleep 0.01
done
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "restart accounts=1000000 ready_s=%.2f\n", b - a }' |
  tee "$raw/restart" | sed 's/^/restart: /' >&2
kill -TERM "$spid"
wait "$spid" || true
spid=

if [ -z "${SKIP_CRITERION:-}" ]; then
  cargo bench --bench deduct_mimalloc -- --warm-up-time 1 --measurement-time 3 \
    'deduct/(hot|among_1m)$' >"$raw/criterion" 2>&1
  for b in hot among_1m; do
    python3 -c 'import json, sys; print(sys.argv[2], json.load(open(sys.argv[1]))["median"]["point_estimate"])' \
      "target/criterion/deduct/$b/new/estimates.json" "$b"
  done | tee "$raw/inprocess" | sed 's/^/in-process median ns: /' >&2
fi

python3 - "$raw" "$header" <<'EOF'
import os, re, statistics, sys
raw, header = sys.argv[1], sys.argv[2]

def fields(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)

def num(v):
    return float(re.sub(r"[A-Za-zµ/]+$", "", v))

def read(name):
    try:
        return [fields(l) for l in open(f"{raw}/{name}") if "=" in l and not l.startswith("#")]
    except FileNotFoundError:
        return []

# (scenario, round) -> {server: fields}
runs = {}
for f in read("loopback"):
    runs.setdefault((f["scenario"], f["round"]), {})[f["server"]] = f

def ratios(scenario, key, server="real"):
    out = []
    for (s, _), by in sorted(runs.items()):
        if s == scenario and server in by and "noop" in by:
            out.append(num(by[server][key]) / num(by["noop"][key]))
    return out

def show(rs, fmt="{:.2f}×"):
    if not rs:
        return "not measured"
    m = statistics.median(rs)
    return f"**{fmt.format(m)}** ({fmt.format(min(rs))}–{fmt.format(max(rs))})" if len(rs) > 1 else f"**{fmt.format(m)}**"

def met(rs, ok):
    if not rs:
        return "—"
    m = statistics.median(rs)
    if ok(m):
        return "yes"
    # Shown rounded, a median just short of its bar would read as on it.
    return "no (just short)" if ok(round(m, 2)) else "no"

rows = []
def bar(what, target, rs, ok, fmt="{:.2f}×"):
    rows.append((what, target, show(rs, fmt), met(rs, ok)))

for rpc, name in [("deduct", "Unary `Deduct`"), ("rls", "`ShouldRateLimit`")]:
    s = f"{rpc}/10000"
    bar(f"{name}, 10 k accounts: server CPU per call", "≤ 1.10× no-op", ratios(s, "server_cpu_us/op"), lambda m: m <= 1.10)
    bar(f"{name}, 10 k: throughput", "≥ 0.9×", ratios(s, "ops/s"), lambda m: m >= 0.9)
    bar(f"{name}, 10 k, 1 s flush: p99 (issue 14)", "≤ 1.3×", ratios(s, "p99"), lambda m: m <= 1.3)
    bar(f"{name}, 10 k, 1 s flush: p999 (issue 14)", "≤ 2×", ratios(s, "p999"), lambda m: m <= 2)
for rpc, name in [("batch", "`DeductBatch`"), ("stream", "`DeductStream`")]:
    bar(f"{name}, 100 per message, 10 k: share of the no-op's rate", "≥ 0.6×", ratios(f"{rpc}/10000", "deductions/s"), lambda m: m >= 0.6)
bar("`ShouldRateLimit`, 1 M accounts, warm: throughput", "≥ 0.8×", ratios("rls/1000000", "ops/s"), lambda m: m >= 0.8)
bar("`ShouldRateLimit`, 1 M, warm: p999", "≤ 3×", ratios("rls/1000000", "p999"), lambda m: m <= 3)

first = {}
for f in read("first_pass"):
    first.setdefault(f["round"], {})[f["server"]] = f
fp = [num(by["real"]["ops/s"]) / num(by["noop"]["ops/s"]) for by in first.values() if {"real", "noop"} <= by.keys()]
bar("First pass over 1 M new accounts: throughput", "≥ 0.5×", fp, lambda m: m >= 0.5)

rss = [num(f["idle"]) for f in read("rss")]
bar("1 M resident accounts: RSS once idle", "≤ 400 MB", rss, lambda m: m <= 400, "{:.0f} MB")
inproc = {}
if os.path.exists(f"{raw}/inprocess"):
    inproc = {l.split()[0]: float(l.split()[1]) for l in open(f"{raw}/inprocess")}
bar("In-process deduction, median: hot account", "≤ 100 ns", [inproc["hot"]] if "hot" in inproc else [], lambda m: m <= 100, "{:.0f} ns")
bar("In-process deduction, median: among 1 M", "≤ 300 ns", [inproc["among_1m"]] if "among_1m" in inproc else [], lambda m: m <= 300, "{:.0f} ns")
restart = [num(f["ready_s"]) for f in read("restart")]
bar("Restart ready, 1 M stored accounts", "≤ 2 s", restart, lambda m: m <= 2, "{:.2f} s")

print(f"Run of {header}; ratios are the median (and range) of the rounds, each against the no-op of its round.\n")
print("| Bar | Target | Measured | Met? |")
print("| --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF

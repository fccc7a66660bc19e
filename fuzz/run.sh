#!/usr/bin/env bash
# Runs each fuzz target for a bounded time, one after the other, on one
# core, and prints its executions, coverage and findings.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 600 s each, every target
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The committed seeds (fuzz/corpus/TARGET/seed-*) are read, never written:
# what a run adds goes to fuzz/work/TARGET (ignored by git), and crashes
# to fuzz/artifacts/TARGET. Logs: fuzz/work/TARGET.log.
# NICE (default 15) sets the niceness; extra libFuzzer flags go in
# FUZZ_FLAGS, e.g. FUZZ_FLAGS=-max_len=8192.
set -euo pipefail

cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(journal_decode grpc_request config_parse)
fi

nice -n "${NICE:-15}" cargo +nightly fuzz build -O

found=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t"
    log="work/$t.log"
    before=$(ls "artifacts/$t" | wc -l)
    echo "== $t: ${secs}s" >&2
    # One process (no -jobs: it would log to fuzz-N.log); -rss_limit_mb: a runaway allocation is a finding.
    set +e
    nice -n "${NICE:-15}" cargo +nightly fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 \
        -print_final_stats=1 ${FUZZ_FLAGS:-} >"$log" 2>&1
    rc=$?
    set -e
    # The fuzz crate lives in fuzz/; cargo fuzz writes artifacts there.
    after=$(ls "artifacts/$t" | wc -l)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    corp=$(grep -Eo 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 || true)
    new=$((after - before))
    found=$((found + new))
    printf '%-16s exit=%s execs=%s execs/s=%s %s %s new-artifacts=%s\n' \
        "$t" "$rc" "$runs" "$speed" "$cov" "$corp" "$new"
    if [ "$new" -gt 0 ]; then
        ls -t "artifacts/$t" | head -n "$new" | sed "s|^|    artifacts/$t/|"
        grep -m1 -A3 -E "panicked at|ERROR: libFuzzer" "$log" | sed 's/^/    /' || true
    fi
done
exit $((found > 0))

#!/usr/bin/env bash
# Unary Deduct over TLS against plaintext, beside the `serve --noop`
# baseline, all in one run: noop and the real server, each with and without
# TLS (a P-256 certificate made here with openssl), back to back per round.
#
#   cargo build --release && benches/tls.sh
#
# Servers are pinned to CPU 0 and loadgen to CPU 1. Settings (environment):
# BIN (target/release/packmeter), DURATION (3s), ACCOUNTS (10000),
# ROUNDS (2), RPC (deduct). Prints one JSON line per run, prefixed with
# rpc, round, server.
set -euo pipefail
BIN=${BIN:-target/release/packmeter}
DURATION=${DURATION:-3s}
ACCOUNTS=${ACCOUNTS:-10000}
ROUNDS=${ROUNDS:-2}
RPC=${RPC:-deduct}
work=$(mktemp -d)
declare -A PID PORT SCHEME
cleanup() {
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# A CA, and a server certificate it signs (webpki refuses a CA certificate
# as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$work/ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/tls.crt" 2>/dev/null
TLS=(--tls-cert-file "$work/tls.crt" --tls-key-file "$work/tls.key")
start() { # name scheme port admin [flags...]
  local name=$1 scheme=$2 port=$3 admin=$4
  shift 4
  taskset -c 0 "$BIN" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --store "sqlite://$work/$name.db" --log-format json "$@" >"$work/$name.out" 2>"$work/$name.err" &
  PID[$name]=$!
  PORT[$name]=$port
  SCHEME[$name]=$scheme
  for _ in $(seq 100); do
    grep -q listening "$work/$name.out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$name did not start" >&2
  exit 1
}
start noop http 51201 52201 --noop
start noop-tls https 51202 52202 --noop "${TLS[@]}"
start plain http 51203 52203
start tls https 51204 52204 "${TLS[@]}"
for round in $(seq "$ROUNDS"); do
  for name in noop noop-tls plain tls; do
    prime=() ca=()
    [[ $name != noop* && $round == 1 ]] && prime=(--prime)
    # --tls-ca-file is refused for an http:// server.
    [[ ${SCHEME[$name]} == https ]] && ca=(--tls-ca-file "$work/ca.crt")
    line=$(taskset -c 1 "$BIN" loadgen --server "${SCHEME[$name]}://127.0.0.1:${PORT[$name]}" \
      --server-pid "${PID[$name]}" "${ca[@]}" --rpc "$RPC" --concurrency 32 --connections 2 \
      --duration "$DURATION" --warmup 1s --accounts "$ACCOUNTS" "${prime[@]}" --json 2>/dev/null | tail -1)
    echo "$RPC $round $name $line"
  done
done

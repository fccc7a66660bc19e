# Shared by the loopback benchmark scripts (sourced, not run).

# settle PID...: waits until every given process has been idle for 0.3 s
# (its CPU time, from /proc, unchanged over three 0.1 s samples; at most
# 10 s), so that work a window leaves behind (a flush of up to 65 k
# accounts at 100 k) does not run on CPU 0 during the next window.
settle() {
  local last="" now idle=0 p
  for _ in $(seq 100); do
    now=""
    for p in "$@"; do now+="$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null) "; done
    if [ "$now" = "$last" ]; then
      idle=$((idle + 1))
      [ "$idle" -ge 3 ] && return 0
    else
      idle=0
    fi
    last=$now
    sleep 0.1
  done
}

# serve_one NAME BIN GRPC_PORT ADMIN_PORT [serve flags...]: for a script
# that runs a single server. Makes the scratch directory `work`, starts
# the server (start_server) and sets `spid` to its pid; when the script
# exits, the server is stopped and `work` removed.
serve_one() {
  work=$(mktemp -d)
  spid=
  trap stop_one EXIT
  start_server "$@"
  spid=$SERVED
}
stop_one() {
  [ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
  rm -rf "$work"
}

# start_server NAME BIN GRPC_PORT ADMIN_PORT [serve flags...]: starts
# `BIN serve` pinned to CPU 0, with the SQLite store `$work/NAME.db` (the
# caller's scratch directory, emptied of that store first) and its output
# in `$work/NAME.out` and `.err`; waits for the listening line (at most
# START_TRIES tenths of a second, 100 unless set) and sets SERVED to its
# pid. Exits the script, with the server's errors, if it does not start.
start_server() {
  local name=$1 bin=$2 port=$3 admin=$4
  shift 4
  rm -f "$work/$name.db"*
  taskset -c 0 "$bin" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --store "sqlite://$work/$name.db" --log-format json "$@" \
    >"$work/$name.out" 2>"$work/$name.err" &
  SERVED=$!
  for _ in $(seq "${START_TRIES:-100}"); do
    grep -q listening "$work/$name.out" 2>/dev/null && return 0
    kill -0 "$SERVED" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start:" >&2
  cat "$work/$name.err" >&2
  kill -TERM "$SERVED" 2>/dev/null || true
  exit 1
}

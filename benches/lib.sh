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

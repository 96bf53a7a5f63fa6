# Shared by the bench scripts (source it): processes started into PIDS are killed on exit,
# free loopback ports, and a bounded wait for an HTTP endpoint.
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # port path timeout_s
  for _ in $(seq 1 $(($3 * 10))); do
    curl -sf "http://127.0.0.1:$1$2" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "127.0.0.1:$1$2 did not answer in $3 s" >&2
  return 1
}
